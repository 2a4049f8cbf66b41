"""The parts behind graceful leave, restarts and quarantine, one at a time.

- ``api/drain.py``: requests in flight, the bounded wait, the skip;
- ``machine/state.next_boot``: the boot count behind a restart's incarnation;
- ``engine/host.py``: failures it pins on a worker (a real stand-in llama-server
  that cannot reach a worker's tunnel crashes naming its endpoint);
- ``api/status.py``: ``peers[].quarantine``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cluster import make_info
from ggufs import tiny_gguf
from test_node_inprocess import StandInBackend, until

from mesh_inference.api.drain import Drain, shutting_down
from mesh_inference.api.status import StatusInputs, build_status
from mesh_inference.core.membership import Membership
from mesh_inference.core.plan import Plan
from mesh_inference.engine.host import HostController
from mesh_inference.machine.state import BOOTS_FILE, next_boot

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------- drain
async def test_drain_waits_for_requests_in_flight() -> None:
    drain = Drain()
    assert await drain.wait_idle(0) and not drain.closing
    release = asyncio.Event()

    async def request() -> None:
        with drain.track():
            await release.wait()

    tasks = [asyncio.ensure_future(request()) for _ in range(2)]
    await asyncio.sleep(0)
    assert drain.active == 2
    drain.close()
    waiting = asyncio.ensure_future(drain.wait_idle(30))
    await asyncio.sleep(0.01)
    assert not waiting.done() and drain.closing
    release.set()
    assert await waiting and drain.active == 0
    await asyncio.gather(*tasks)


async def test_drain_is_bounded_and_can_be_cut_short() -> None:
    drain = Drain()
    with drain.track():
        assert not await drain.wait_idle(0.01)  # timed out: still one in flight
        waiting = asyncio.ensure_future(drain.wait_idle(30))
        await asyncio.sleep(0)
        drain.skip()  # a second Ctrl-C
        assert not await waiting
    assert drain.active == 0


async def test_the_refusal_says_why() -> None:
    resp = shutting_down()
    body = b"".join([chunk async for chunk in resp.body_iter])
    assert resp.status == 503 and b"shutting_down" in body and b"shutting down" in body


# ---------------------------------------------------------------------- boots
def test_boots_are_counted_across_starts(tmp_path: Path) -> None:
    assert [next_boot(tmp_path) for _ in range(3)] == [1, 2, 3]
    (tmp_path / BOOTS_FILE).write_text("garbage\n")
    assert next_boot(tmp_path) == 1  # an unreadable count never keeps the node from starting
    assert (tmp_path / BOOTS_FILE).read_text() == "1\n"


# ---------------------------------------------------------------------- host
async def test_the_host_reports_a_worker_it_cannot_reach(tmp_path: Path) -> None:
    reports: list[tuple[str, str]] = []
    worker = "b" * 16

    async def no_tunnel(peer: str) -> tuple[asyncio.StreamReader, object]:
        raise ConnectionError(f"no connection to {peer}")

    host = HostController(
        StandInBackend(), state_dir=tmp_path, open_tunnel=no_tunnel,
        local_rpc_port=lambda: 1, ctx_size=512, threads=1, on_state=lambda _s, _d: None,
        on_worker_failure=lambda w, r: reports.append((w, r)),
    )  # fmt: skip
    plan = Plan("a" * 16, (worker,), (0.5, 0.5), 1)
    try:
        host.apply(plan, tiny_gguf(tmp_path / "tiny.gguf"), "m")
        # The stand-in llama-server greets the worker's tunnel port first: the tunnel
        # cannot open a stream, so it hangs up, and llama-server dies naming that port.
        await until(lambda: {r.split(":")[0] for _, r in reports} >= {
            "a tunnel to it could not be opened", "llama-server crashed"}, "both reports")
        port = host.tunnel_stats()[worker]["port"]
        assert {w for w, _ in reports} == {worker}
        crash = next(r for _, r in reports if r.startswith("llama-server crashed"))
        assert f"127.0.0.1:{port}" in crash
    finally:
        await host.stop()


async def test_a_crash_naming_no_tunnel_blames_nobody(tmp_path: Path) -> None:
    reports: list[tuple[str, str]] = []

    async def unused(peer: str) -> tuple[asyncio.StreamReader, object]:
        raise AssertionError("no tunnel expected")

    host = HostController(
        StandInBackend(), state_dir=tmp_path, open_tunnel=unused, local_rpc_port=lambda: 1,
        ctx_size=512, threads=1, on_state=lambda _s, _d: None,
        on_worker_failure=lambda w, r: reports.append((w, r)),
    )  # fmt: skip
    try:
        # alone (no worker): its own rpc-server (port 1) is unreachable: it crashes
        host.apply(Plan("a" * 16, (), (1.0,), 1), tiny_gguf(tmp_path / "tiny.gguf"), "m")
        await until(lambda: host.crashes >= 1, "a crash")
        assert reports == []
    finally:
        await host.stop()


# ---------------------------------------------------------------------- status
def test_status_shows_each_peers_quarantine() -> None:
    me, peer, other = make_info("a"), make_info("b"), make_info("c")
    m = Membership(me, 0.0)
    for info in (peer, other):
        m.handle_connected(info, 0.0)
    q = {peer.node_id: {"reason": "its rpc-server went down", "until": 1_800_000_000.0}}
    st = build_status(StatusInputs(
        node_id=me.node_id, client=False, http_url="http://127.0.0.1:1", mesh_id=None,
        join_token=None, membership=m, now=0.0, plan=None, rtt=lambda _p: None,
        rpc_state="ready", engine_state="stopped", engine_detail="", engine_startup_s=None,
        backend=None, backend_error=None, model={}, tunnels={}, quarantine=q,
    ))  # fmt: skip
    by_id = {p["id"]: p for p in st["peers"]}
    assert by_id[peer.node_id]["quarantine"] == q[peer.node_id]
    assert by_id[other.node_id]["quarantine"] is None
