"""Real QUIC on loopback: auth, control frames, peer loss, and the TCP tunnel."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mesh_inference.dcf import Frame, MessageType
from mesh_inference.identity import MeshCredentials, NodeIdentity
from mesh_inference.quic import MeshEndpoint, PeerConnection
from mesh_inference.tunnel import TunnelListener, bridge_to_local

pytestmark = pytest.mark.timeout(60)


@dataclass
class Side:
    ep: MeshEndpoint
    port: int
    connected: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    frames: list[tuple[str, Frame]] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)


async def make_side(mesh: MeshCredentials, local_service_port: int | None = None) -> Side:
    ident = NodeIdentity.generate()
    side: Side

    def connected(conn: PeerConnection) -> None:
        side.connected.append(conn.peer_id)
        side.event.set()

    def lost(peer: str, reason: str) -> None:
        side.lost.append((peer, reason))
        side.event.set()

    def control(peer: str, frame: Frame) -> None:
        side.frames.append((peer, frame))
        side.event.set()

    async def on_stream(peer: str, first: Frame, reader: asyncio.StreamReader, writer: Any) -> None:
        assert first.type == MessageType.OPEN_TUNNEL
        assert local_service_port is not None
        await bridge_to_local(reader, writer, "127.0.0.1", local_service_port)

    ep = MeshEndpoint(
        ident,
        mesh,
        host="127.0.0.1",
        port=0,
        on_peer_connected=connected,
        on_peer_lost=lost,
        on_control_frame=control,
        on_stream=on_stream,
    )
    side = Side(ep, 0)
    side.port = await ep.start()
    return side


async def wait_until(side: Side, pred: Any, limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not pred():
            side.event.clear()
            await side.event.wait()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Side, Side]]:
    mesh = MeshCredentials.generate()
    a, b = await make_side(mesh), await make_side(mesh)
    yield a, b
    await a.ep.close()
    await b.ep.close()


async def test_authenticated_peers_exchange_control_frames(pair: tuple[Side, Side]) -> None:
    a, b = pair
    peer = await a.ep.dial(f"127.0.0.1:{b.port}")
    assert peer == b.ep.identity.node_id
    await wait_until(b, lambda: b.connected)
    assert b.connected == [a.ep.identity.node_id]
    a.ep.send_control(peer, MessageType.HEARTBEAT, b'{"inc":1}')
    await wait_until(b, lambda: b.frames)
    got_peer, frame = b.frames[0]
    assert got_peer == a.ep.identity.node_id
    assert frame.type == MessageType.HEARTBEAT and frame.payload == b'{"inc":1}'
    b.ep.send_control(got_peer, MessageType.HEARTBEAT, b'{"inc":2}')
    await wait_until(a, lambda: a.frames)
    assert a.frames[0][1].payload == b'{"inc":2}'
    assert a.ep.rtt(peer) is not None


async def test_wrong_secret_is_refused() -> None:
    good = await make_side(MeshCredentials.generate())
    mesh = MeshCredentials.generate()
    bad = await make_side(MeshCredentials(good.ep.mesh.mesh_id, mesh.secret))
    try:
        with pytest.raises(ConnectionError, match="auth failed|closed"):
            await bad.ep.dial(f"127.0.0.1:{good.port}", timeout=5)
        await asyncio.sleep(0.2)
        assert good.connected == [] and good.ep.peers() == []
        assert bad.ep.peers() == []
    finally:
        await good.ep.close()
        await bad.ep.close()


async def test_other_mesh_is_refused() -> None:
    a = await make_side(MeshCredentials.generate())
    b = await make_side(MeshCredentials.generate())
    try:
        with pytest.raises(ConnectionError):
            await b.ep.dial(f"127.0.0.1:{a.port}", timeout=5)
        assert a.ep.peers() == []
    finally:
        await a.ep.close()
        await b.ep.close()


async def test_peer_lost_when_other_side_closes(pair: tuple[Side, Side]) -> None:
    a, b = pair
    await a.ep.dial(f"127.0.0.1:{b.port}")
    await wait_until(b, lambda: b.connected)
    await a.ep.close()
    await wait_until(b, lambda: b.lost)
    assert b.lost[0][0] == a.ep.identity.node_id
    assert b.ep.peers() == []


async def test_garbage_on_control_stream_drops_only_that_peer(pair: tuple[Side, Side]) -> None:
    a, b = pair
    peer = await a.ep.dial(f"127.0.0.1:{b.port}")
    await wait_until(b, lambda: b.connected)
    proto = a.ep._peers[peer]
    proto._quic.send_stream_data(0, b"\xff" * 40)  # unknown frame type on the control stream
    proto.transmit()
    await wait_until(b, lambda: b.lost)
    assert "unknown frame type" in b.lost[0][1], b.lost
    # b still accepts new, well-behaved peers
    c = await make_side(b.ep.mesh)
    try:
        assert await c.ep.dial(f"127.0.0.1:{b.port}") == b.ep.identity.node_id
    finally:
        await c.ep.close()


# ---------------------------------------------------------------- tunnel
@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """A real TCP service: echoes every byte back, half-closes after the client's EOF."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()


@pytest.fixture
async def tunnel(echo_server: int) -> AsyncIterator[TunnelListener]:
    mesh = MeshCredentials.generate()
    worker = await make_side(mesh, local_service_port=echo_server)
    host = await make_side(mesh)
    peer = await host.ep.dial(f"127.0.0.1:{worker.port}")

    async def opener() -> tuple[asyncio.StreamReader, Any]:
        return await host.ep.open_stream(peer, MessageType.OPEN_TUNNEL, b'{"service":"rpc"}')

    listener = TunnelListener(opener)
    await listener.start()
    yield listener
    await listener.close()
    await host.ep.close()
    await worker.ep.close()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 100_000):
            writer.write(view[i : i + 100_000])
            await writer.drain()
        writer.write_eof()  # half-close: the echo must still come back

    sender = asyncio.ensure_future(send())
    got = await reader.read(-1)
    await sender
    writer.close()
    return got


async def test_tunnel_carries_megabytes_both_ways(tunnel: TunnelListener) -> None:
    payload = os.urandom(4 << 20)
    got = await roundtrip(tunnel.port, payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert tunnel.bytes_up == len(payload) and tunnel.bytes_down == len(payload)


async def test_tunnel_many_concurrent_connections(tunnel: TunnelListener) -> None:
    payloads = [os.urandom(50_000 + i * 1000) for i in range(20)]
    results = await asyncio.gather(*(roundtrip(tunnel.port, p) for p in payloads))
    assert results == payloads
    assert tunnel.connections == 20


async def test_tunnel_to_a_dead_service_closes_the_client(tmp_path: Path) -> None:
    mesh = MeshCredentials.generate()
    # A port with nothing listening: the worker cannot reach its service.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    worker = await make_side(mesh, local_service_port=dead_port)
    host = await make_side(mesh)
    try:
        peer = await host.ep.dial(f"127.0.0.1:{worker.port}")

        async def opener() -> tuple[asyncio.StreamReader, Any]:
            return await host.ep.open_stream(peer, MessageType.OPEN_TUNNEL, b'{"service":"rpc"}')

        listener = TunnelListener(opener)
        await listener.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"hello")
        async with asyncio.timeout(10):
            assert await reader.read(-1) == b""
        writer.close()
        await listener.close()
    finally:
        await host.ep.close()
        await worker.ep.close()
