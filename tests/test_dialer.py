"""The dialer: retries with back-off, stops when connected or left, never dials itself."""

from __future__ import annotations

import asyncio

import pytest

from mesh_inference.net import dialer as dialer_mod
from mesh_inference.net.dialer import Dialer

pytestmark = pytest.mark.timeout(30)


class FakeMesh:
    """Dial outcomes scripted per address; connected peers and statuses as a node sees them."""

    def __init__(self, failures: dict[str, int], ids: dict[str, str]) -> None:
        self.failures = dict(failures)
        self.ids = ids
        self.connected: set[str] = set()
        self.status: dict[str, str] = {}
        self.calls: list[str] = []
        self.dialed = asyncio.Event()

    async def dial(self, addr: str) -> str:
        self.calls.append(addr)
        if self.failures.get(addr, 0) > 0:
            self.failures[addr] -= 1
            raise ConnectionError("unreachable")
        self.connected.add(self.ids[addr])
        self.dialed.set()
        return self.ids[addr]

    def make(self, own: set[str] | None = None) -> Dialer:
        return Dialer(
            dial=self.dial,
            connected=lambda: self.connected,
            status_of=self.status.get,
            own_addrs=lambda: own or set(),
        )


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dialer_mod, "FIRST_RETRY_S", 0.001)
    monkeypatch.setattr(dialer_mod, "MAX_RETRY_S", 0.004)
    monkeypatch.setattr(dialer_mod, "ALONE_CHECK_S", 0.01)


async def test_a_gossiped_peer_is_retried_until_it_answers_then_left_alone() -> None:
    mesh = FakeMesh({"b:1": 3}, {"b:1": "b"})
    d = mesh.make()
    d.peer_discovered("b", ["b:1"])
    d.peer_discovered("b", ["b:1"])  # a second report does not start a second loop
    await asyncio.wait_for(mesh.dialed.wait(), 10)
    await asyncio.sleep(0.05)
    assert mesh.calls == ["b:1"] * 4 and d.active == 0
    await d.close()


async def test_a_peer_that_left_is_not_dialed_and_our_own_address_never() -> None:
    mesh = FakeMesh({"b:1": 1000}, {"b:1": "b", "me:1": "me"})
    d = mesh.make(own={"me:1"})
    d.bootstrap(["me:1"])
    d.peer_discovered("b", ["b:1"])
    while len(mesh.calls) < 3:  # noqa: ASYNC110 - counting scripted failures
        await asyncio.sleep(0.001)
    mesh.status["b"] = "left"
    await asyncio.sleep(0.05)
    assert "me:1" not in mesh.calls and d.active == 0
    await d.close()


async def test_bootstrap_redials_when_the_node_finds_itself_alone() -> None:
    mesh = FakeMesh({}, {"a:1": "a"})
    d = mesh.make()
    d.bootstrap(["a:1"])
    await asyncio.wait_for(mesh.dialed.wait(), 10)
    mesh.dialed.clear()
    mesh.connected.clear()  # the mesh went away
    await asyncio.wait_for(mesh.dialed.wait(), 10)
    assert mesh.calls == ["a:1", "a:1"] and d.active == 1
    await d.close()
    assert d.active == 0
