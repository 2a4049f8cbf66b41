"""The host controller waits for a growing plan to settle; anything else applies at once.

Real processes (the stand-in llama-server of tests/standin_engine.py) behind a
real ``HostController``; the workers' rpc-servers are one in-process HELLO
responder, reached by the tunnels directly instead of over QUIC. No timing is
asserted: a settle period far longer than the test's timeout shows what
waits and what does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ggufs import tiny_gguf
from standin_engine import HELLO_REPLY, HELLO_REQUEST
from test_node_inprocess import StandInBackend, until

from mesh_inference.core.plan import Plan
from mesh_inference.engine.host import HostController

pytestmark = pytest.mark.timeout(60)

HOST, B, C = "a" * 16, "b" * 16, "c" * 16
FOREVER = 3600.0  # a settle period no test could wait out


def plan(*workers: str) -> Plan:
    n = len(workers) + 1
    return Plan(HOST, workers, tuple(round(1 / n, 3) for _ in range(n)), 1)


async def _rpc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An rpc-server that answers HELLO (all the stand-in llama-server asks)."""
    try:
        while await reader.readexactly(len(HELLO_REQUEST)) == HELLO_REQUEST:
            writer.write(HELLO_REPLY)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


class Rig:
    def __init__(self, tmp: Path, rpc_port: int, settle: float, settle_cap: float) -> None:
        self.model = tiny_gguf(tmp / "tiny.gguf")
        self.states: list[str] = []
        self.rpc_port = rpc_port

        async def open_tunnel(_worker: str) -> tuple[asyncio.StreamReader, Any]:
            return await asyncio.open_connection("127.0.0.1", rpc_port)

        self.host = HostController(
            StandInBackend(), state_dir=tmp, open_tunnel=open_tunnel,
            local_rpc_port=lambda: rpc_port, ctx_size=512, threads=1,
            on_state=lambda s, _d: self.states.append(s), settle=settle, settle_cap=settle_cap,
        )  # fmt: skip

    def apply(self, p: Plan) -> None:
        self.host.apply(p, self.model, "m")

    async def settled(self) -> None:
        # Bounded: an application that waited for a settle period would fail the test here.
        async with asyncio.timeout(20):
            await self.host.settled()

    async def serving(self, p: Plan) -> None:
        """Until the engine is ready on exactly ``p``'s devices."""
        await self.settled()
        await until(lambda: self.host.state == "ready", "the engine is ready")
        assert self.devices() == len(p.workers) + 1

    def devices(self) -> int:
        return len(self.host.tunnel_stats()) + 1

    @property
    def relaunches(self) -> int:
        return self.host.restarts["plan"]


@pytest.fixture
async def rpc_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_rpc, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_nodes_joining_one_by_one_cost_one_relaunch(tmp_path: Path, rpc_port: int) -> None:
    rig = Rig(tmp_path, rpc_port, settle=0.3, settle_cap=FOREVER)
    try:
        rig.apply(plan())  # no engine yet: at once
        await rig.serving(plan())
        rig.apply(plan(B))  # a worker joins: the engine keeps serving, the growth waits
        assert rig.host.settling and rig.host.state == "settling"
        assert rig.host.url is not None  # requests are still served meanwhile
        rig.apply(plan(B, C))  # another one, before the plan settled: waits again
        assert rig.host.settling and rig.relaunches == 0
        await rig.serving(plan(B, C))
        assert rig.relaunches == 1 and not rig.host.settling
        assert rig.states.count("starting") == 2  # the first launch and one relaunch
    finally:
        await rig.host.stop()


async def test_a_plan_that_loses_a_worker_applies_at_once(tmp_path: Path, rpc_port: int) -> None:
    rig = Rig(tmp_path, rpc_port, settle=FOREVER, settle_cap=FOREVER)
    try:
        rig.apply(plan(B, C))  # no engine yet: at once, whatever the settle period
        await rig.serving(plan(B, C))
        rig.host.drop_worker(C)  # C died
        rig.apply(plan(B))
        assert not rig.host.settling
        await rig.serving(plan(B))
        assert rig.relaunches == 1
    finally:
        await rig.host.stop()


async def test_a_death_during_a_waiting_growth_applies_at_once(
    tmp_path: Path, rpc_port: int
) -> None:
    rig = Rig(tmp_path, rpc_port, settle=FOREVER, settle_cap=FOREVER)
    try:
        rig.apply(plan(B))
        await rig.serving(plan(B))
        rig.apply(plan(B, C))
        assert rig.host.settling
        rig.host.drop_worker(B)  # B dies while C waits to join: C joins with the failover
        rig.apply(plan(C))
        assert not rig.host.settling
        await rig.serving(plan(C))
        assert rig.relaunches == 1 and set(rig.host.tunnel_stats()) == {C}
    finally:
        await rig.host.stop()


async def test_a_growth_undone_before_it_applied_relaunches_nothing(
    tmp_path: Path, rpc_port: int
) -> None:
    rig = Rig(tmp_path, rpc_port, settle=FOREVER, settle_cap=FOREVER)
    try:
        rig.apply(plan(B))
        await rig.serving(plan(B))
        rig.apply(plan(B, C))  # C joins ...
        assert rig.host.state == "settling"
        rig.apply(plan(B))  # ... and is gone again before the plan settled
        await rig.serving(plan(B))
        assert rig.relaunches == 0 and not rig.host.settling
    finally:
        await rig.host.stop()


async def test_joins_that_keep_coming_wait_at_most_the_cap(tmp_path: Path, rpc_port: int) -> None:
    rig = Rig(tmp_path, rpc_port, settle=FOREVER, settle_cap=0.3)
    try:
        rig.apply(plan())
        await rig.serving(plan())
        rig.apply(plan(B))
        assert rig.host.settling
        await rig.serving(plan(B))  # bounded by the cap, not the settle period
        assert rig.relaunches == 1
    finally:
        await rig.host.stop()


async def test_another_host_or_no_plan_applies_at_once(tmp_path: Path, rpc_port: int) -> None:
    rig = Rig(tmp_path, rpc_port, settle=FOREVER, settle_cap=FOREVER)
    try:
        rig.apply(plan())
        await rig.serving(plan())
        rig.apply(plan(B))
        assert rig.host.settling
        rig.host.apply(None, idle=("stopped", "not the host"))  # e.g. a bigger holder hosts now
        assert not rig.host.settling
        await rig.settled()
        assert rig.host.state == "stopped" and rig.host.url is None
        rig.apply(plan(B))  # hosting again: no engine runs, so at once
        await rig.serving(plan(B))
    finally:
        await rig.host.stop()
