"""Several real nodes in one event loop: membership → plan → engine relaunch → status.

The nodes are the real composition root with real QUIC on loopback and real
HTTP gateways; only the engine is a stand-in process (tests/standin_engine.py:
an "rpc-server" that answers RPC HELLO and an HTTP "llama-server" that says
HELLO through every --rpc endpoint before it reports healthy), so a whole
re-plan runs in well under a second instead of a llama.cpp load.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ggufs import tiny_gguf

from mesh_inference.core.dcf import MessageType
from mesh_inference.core.membership import MembershipTimers
from mesh_inference.core.messages import OpenTunnel, encode_payload
from mesh_inference.engine.backends import EngineBackend
from mesh_inference.engine.weights import PASS_THROUGH
from mesh_inference.machine.resources import GIB, MemoryOffer
from mesh_inference.node import Node, NodeConfig, NodeIO

pytestmark = pytest.mark.timeout(60)

STANDIN = Path(__file__).with_name("standin_engine.py")
# Quick heartbeats and gossip, so views converge fast; death detection stays
# loose, because these tests make nodes leave with a Goodbye, and a loaded CI
# machine must not make a live peer look dead.
FAST = MembershipTimers(
    heartbeat_interval=0.05, suspect_after=1.5, dead_after=3.0, gossip_interval=0.2,
    forget_after=5.0,
)  # fmt: skip


class StandInBackend(EngineBackend):
    name = "stand-in"

    def rpc_server_command(self, *, port: int, threads: int, cache_dir: Path | None) -> list[str]:
        return [sys.executable, str(STANDIN), "rpc", "--port", str(port)]

    def _server_argv(
        self, model: Path, endpoints: list[str], split: list[float], port: int,
        ctx_size: int, threads: int, alias: str,
    ) -> list[str]:  # fmt: skip
        return [sys.executable, str(STANDIN), "server", "--port", str(port),
                "--rpc", ",".join(endpoints), "--split", ",".join(f"{s:.4f}" for s in split),
                "--alias", alias, "--model", str(model)]  # fmt: skip


def make_node(tmp: Path, name: str, gib: int, **over: Any) -> Node:
    settings: dict[str, Any] = dict(
        state_dir=tmp / name, name=name, http_port=0, quic_host="127.0.0.1", quic_port=0,
        mdns=False, models_dir=tmp / "models", threads=1, timers=FAST,
        plan_settle=0.3,  # nodes join here within a fraction of a second of each other
    )  # fmt: skip
    config = NodeConfig(**{**settings, **over})
    io = NodeIO(
        backend=lambda _c: StandInBackend(),
        memory=lambda _c: MemoryOffer(gib * GIB, "override", "test"),
    )
    return Node(config, io)


async def until(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Wait for a condition over several nodes' status (no single event covers them all)."""
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110 - a condition across nodes, not one event
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not reached within {within} s: {what}") from None


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[list[Node]]:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    nodes = [make_node(tmp_path, "a", 4, model_ref=str(model))]
    await nodes[0].start()
    assert nodes[0].join_token is not None
    for name, gib in (("b", 2), ("c", 1)):
        node = make_node(tmp_path, name, gib, join=nodes[0].join_token)
        nodes.append(node)
        await node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


def ready_with(node: Node, devices: int) -> bool:
    st = node.status()
    return st["ready"] and len(st["plan"]["order"]) == devices


async def ask(node: Node) -> dict[str, Any]:
    """What the engine behind ``node``'s gateway says about its own command line."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{node.http_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    info: dict[str, Any] = json.loads(body["choices"][0]["message"]["content"])
    return info


async def test_three_nodes_plan_and_serve_through_tunnels(mesh: list[Node]) -> None:
    a, b, c = mesh
    await until(lambda: all(ready_with(n, 3) for n in mesh), "3-device plan ready everywhere")
    st = b.status()
    assert st["host_id"] == a.node_id
    assert st["plan"]["order"] == [b.node_id, c.node_id, a.node_id]  # host last
    assert st["plan"]["tensor_split"] == pytest.approx([2 / 7, 1 / 7, 4 / 7], abs=1e-3)
    assert {p["role"] for p in st["peers"]} == {"host", "worker"}
    # The stand-in engine greeted both workers through their tunnels before it became
    # ready, and it answers through a worker's gateway, forwarded to the host over QUIC.
    info = await ask(c)
    assert len(info["rpc"]) == 3 and info["split"] == pytest.approx([2 / 7, 1 / 7, 4 / 7], abs=1e-3)
    tunnels = a.status()["tunnels"]
    assert set(tunnels) == {b.node_id, c.node_id}
    assert all(t["bytes_up"] > 0 and t["bytes_down"] > 0 for t in tunnels.values())


async def test_a_leaving_worker_relaunches_the_engine_on_two_devices(mesh: list[Node]) -> None:
    a, b, c = mesh
    await until(lambda: ready_with(a, 3), "3-device plan")
    await c.stop()
    await until(lambda: ready_with(a, 2) and ready_with(b, 2), "re-planned without c")
    assert a.status()["plan"]["order"] == [b.node_id, a.node_id]
    assert len((await ask(b))["rpc"]) == 2
    assert set(a.status()["tunnels"]) == {b.node_id}


async def test_worker_refuses_a_tunnel_from_a_peer_that_is_not_the_host(
    mesh: list[Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    _a, b, c = mesh
    await until(lambda: ready_with(c, 3), "3-device plan")
    worker = c._worker
    assert worker is not None and b._endpoint is not None
    monkeypatch.setattr(worker, "_host_converge_s", 0.2)
    # b is an authenticated member, but not the host: c's rpc-server stays closed to it.
    reader, writer = await b._endpoint.open_stream(
        c.node_id, MessageType.OPEN_TUNNEL, encode_payload(OpenTunnel("rpc"))
    )
    writer.write(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))  # RPC HELLO
    async with asyncio.timeout(10):
        try:
            got = await reader.read()
        except ConnectionResetError:
            got = b""
    assert got == b"" and worker.refused == 1
    # The host's own tunnels keep working.
    assert len((await ask(b))["rpc"]) == 3


async def test_a_node_that_joins_later_is_planned_in(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    a = make_node(tmp_path, "a", 4, model_ref=str(model))
    await a.start()
    b = make_node(tmp_path, "b", 8, join=a.join_token)
    try:
        await until(lambda: ready_with(a, 1), "alone: one device")
        await b.start()
        await until(lambda: ready_with(a, 2) and ready_with(b, 2), "b planned in")
        # b follows the mesh model, finds the same file here, and has the most memory:
        # the new, bigger node becomes the host, and a serves as its worker.
        assert a.status()["host_id"] == b.node_id
        assert a.status()["plan"]["order"] == [a.node_id, b.node_id]
    finally:
        await b.stop()
        await a.stop()


async def test_a_joining_node_costs_one_relaunch_and_a_death_relaunches_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    a = make_node(tmp_path, "a", 4, model_ref=str(model))
    await a.start()
    b = make_node(tmp_path, "b", 2, join=a.join_token)
    c = make_node(tmp_path, "c", 1, join=a.join_token)
    try:
        await b.start()
        await until(lambda: ready_with(a, 2), "a and b serve")
        host = a._host
        assert host is not None
        plans, relaunches = a._plan_changes, host.restarts["plan"]
        # c finds the mesh model's file here (the shared models dir): before it has said
        # so, and while it indexes the file, it stays out; then it comes in once.
        await c.start()
        await until(lambda: ready_with(a, 3) and ready_with(c, 3), "c planned in")
        await a.settled()
        assert a._plan_changes == plans + 1
        assert host.restarts["plan"] == relaunches + 1
        assert peer_entry(a, c.node_id)["model_sha256"] == a._model.sha256
        # A death applies at once: with a settle period no test could wait out, the
        # failover still relaunches the engine right away.
        monkeypatch.setattr(host, "_settle", 3600.0)
        monkeypatch.setattr(host, "_settle_cap", 3600.0)
        # c dies as under kill -9: from now on not a datagram leaves it (no Goodbye, no
        # CONNECTION_CLOSE); a notices the silence (FAST.dead_after).
        assert c._endpoint is not None and c._endpoint._sock is not None
        for sock in (c._endpoint._sock, *c._endpoint._extra_socks):
            monkeypatch.setattr(sock, "send_all", lambda _datagrams: None)
        await c.stop()
        await until(lambda: len(a.status()["plan"]["order"]) == 2, "a plans without c")
        assert a._members is not None
        assert a._members.membership.status_of(c.node_id) == "dead"
        async with asyncio.timeout(20):
            await a.settled()
        assert host.restarts["plan"] == relaunches + 2 and not host.settling
        await until(lambda: ready_with(a, 2), "serving on a and b")
        assert len((await ask(b))["rpc"]) == 2
    finally:
        for node in (c, b, a):
            await node.stop()


def peer_entry(node: Node, peer_id: str) -> dict[str, Any]:
    return next(p for p in node.status()["peers"] if p["id"] == peer_id)


async def test_a_worker_without_the_file_copies_it_from_a_holder(tmp_path: Path) -> None:
    shared, private = tmp_path / "models", tmp_path / "b-models"
    shared.mkdir()
    model = tiny_gguf(shared / "tiny.gguf")
    a = make_node(tmp_path, "a", 4, model_ref="tiny")  # a name in a's models dir only
    await a.start()
    b = make_node(tmp_path, "b", 2, join=a.join_token, models_dir=private)
    try:
        await b.start()
        await until(lambda: b._model.sha256 is not None, "b copied the file and indexed it")
        assert (private / "tiny.gguf").read_bytes() == model.read_bytes()
        assert not (private / "tiny.gguf.part").exists()
        fetch = b.status()["model_fetch"]
        assert fetch["state"] == "done" and fetch["from"] == a.node_id
        assert fetch["bytes"] == fetch["total"] == model.stat().st_size
        # b now announces the very file the host has: it is a holder, sent references.
        await until(
            lambda: peer_entry(a, b.node_id)["model_sha256"] == a._model.sha256
            and ready_with(a, 2),
            "a plans b in as a holder of the same file",
        )
        assert peer_entry(a, b.node_id)["has_model"] is True
        assert a.status()["plan"]["order"] == [b.node_id, a.node_id]
        assert a._host_transforms(b.node_id) is not PASS_THROUGH
        assert a._files.sent_bytes == model.stat().st_size
    finally:
        await b.stop()
        await a.stop()


async def test_no_model_copy_keeps_a_byte_worker(tmp_path: Path) -> None:
    shared, private = tmp_path / "models", tmp_path / "b-models"
    shared.mkdir()
    tiny_gguf(shared / "tiny.gguf")
    a = make_node(tmp_path, "a", 4, model_ref="tiny")
    await a.start()
    b = make_node(tmp_path, "b", 2, join=a.join_token, models_dir=private, no_model_copy=True)
    try:
        await b.start()
        await until(lambda: ready_with(a, 2) and a._model.sha256 is not None, "b planned in")
        await asyncio.sleep(0.5)  # time enough for a copy, if one were made
        assert a.status()["plan"]["order"] == [b.node_id, a.node_id]
        assert b.status()["model_fetch"] is None and not private.exists()
        assert peer_entry(a, b.node_id)["has_model"] is False
        assert a._host_transforms(b.node_id) is PASS_THROUGH  # weights cross as bytes
        assert a._files.sent_bytes == 0
        assert len((await ask(b))["rpc"]) == 2
    finally:
        await b.stop()
        await a.stop()
