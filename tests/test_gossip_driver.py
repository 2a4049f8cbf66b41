"""MembershipDriver's timer: one loop.call_at handle, re-armed only when the deadline moves."""

from __future__ import annotations

import asyncio
from typing import Any

from mesh_inference.net.gossip import MembershipDriver


class FakeMembership:
    """Asks for a timer every ``interval`` seconds and counts the expiries handled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.deadline: float | None = loop.time() + interval
        self.handled: list[float] = []
        self.local = None

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        assert self.deadline is not None and now >= self.deadline
        self.handled.append(now)
        self.deadline = now + self.interval

    def next_event(self) -> Any:
        return None

    def handle_connected(self, peer_id: str, now: float) -> None:
        pass

    def pop_outgoing(self) -> list[Any]:
        return []

    def leave(self, now: float) -> None:
        pass


async def test_the_timer_fires_at_each_deadline_and_stops() -> None:
    loop = asyncio.get_running_loop()
    core = FakeMembership(loop, 0.05)
    calls: list[list[Any]] = []
    driver = MembershipDriver(
        core,  # type: ignore[arg-type]
        send=lambda *a: None, disconnect=lambda *a: None, on_events=calls.append,
    )
    driver.start()
    await asyncio.sleep(0.33)
    assert 5 <= len(core.handled) <= 7  # every 50 ms, never early (asserted in the fake)
    assert calls == []  # expiries that decided nothing cost no re-plan
    await driver.stop()
    n = len(core.handled)
    await asyncio.sleep(0.12)
    assert len(core.handled) == n


async def test_inputs_that_leave_the_deadline_alone_do_not_rearm_the_timer() -> None:
    loop = asyncio.get_running_loop()
    core = FakeMembership(loop, 10.0)
    driver = MembershipDriver(
        core,  # type: ignore[arg-type]
        send=lambda *a: None, disconnect=lambda *a: None, on_events=lambda ev: None,
    )
    driver.start()
    handle = driver._timer
    assert handle is not None
    for _ in range(100):
        driver._pump()  # what every heartbeat received does
    assert driver._timer is handle and not handle.cancelled()
    core.deadline = loop.time() + 0.01  # the deadline moved: re-armed
    driver._pump()
    assert driver._timer is not handle and handle.cancelled()
    await asyncio.sleep(0.05)
    assert len(core.handled) == 1
    await driver.stop()


async def test_on_events_runs_for_events_and_local_changes_only() -> None:
    loop = asyncio.get_running_loop()
    core = FakeMembership(loop, 10.0)
    calls: list[list[Any]] = []
    driver = MembershipDriver(
        core,  # type: ignore[arg-type]
        send=lambda *a: None, disconnect=lambda *a: None, on_events=calls.append,
    )
    driver.start()
    driver._pump()  # a heartbeat that changed nothing
    assert calls == []
    driver.peer_connected("b" * 16)  # a connection change always counts
    assert calls == [[]]
    await driver.stop()
