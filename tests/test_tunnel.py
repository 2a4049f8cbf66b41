"""TCP ⇄ QUIC tunnel over real loopback: TCP service ← worker endpoint ← host endpoint ← TCP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mesh_inference.core.dcf import Frame, MessageType
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.net.endpoint import MeshEndpoint, QuicStreamWriter
from mesh_inference.net.tunnel import TransformFactory, TunnelListener, bridge_to_local

pytestmark = pytest.mark.timeout(60)

LINGER_0 = struct.pack("ii", 1, 0)  # close() sends RST
Service = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes every byte; half-closes after the client's EOF."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads everything, and only after the client's EOF answers sha256 + a 2 MB tail."""
    h = hashlib.sha256()
    while data := await reader.read(65536):
        h.update(data)
    writer.write(h.digest() + bytes(2 << 20))
    await writer.drain()
    writer.close()


async def hang_up_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads 5 bytes, answers, then closes the connection while the client is still there."""
    await reader.readexactly(5)
    writer.write(b"bye")
    await writer.drain()
    writer.close()


@dataclass
class Tunnel:
    listener: TunnelListener
    worker: MeshEndpoint
    host: MeshEndpoint
    worker_handlers: list[str]

    @property
    def port(self) -> int:
        return self.listener.port


@contextlib.asynccontextmanager
async def tunnel_to(
    service_port: int, *, transforms: TransformFactory | None = None
) -> AsyncIterator[Tunnel]:
    mesh = MeshCredentials.generate()
    handled: list[str] = []

    async def worker_stream(
        peer: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        assert first.type == MessageType.OPEN_TUNNEL and first.payload == b'{"service":"rpc"}'
        handled.append(peer)
        await bridge_to_local(reader, writer, "127.0.0.1", service_port)

    async def no_streams(*args: Any) -> None:
        raise AssertionError("the host accepts no streams here")

    def endpoint(on_stream: Any) -> MeshEndpoint:
        return MeshEndpoint(
            NodeIdentity.generate(),
            mesh,
            host="127.0.0.1",
            on_peer_connected=lambda conn: None,
            on_peer_lost=lambda peer, reason: None,
            on_control_frame=lambda peer, frame: None,
            on_stream=on_stream,
        )

    worker, host = endpoint(worker_stream), endpoint(no_streams)
    worker_port = await worker.start()
    await host.start()
    listener: TunnelListener | None = None
    try:
        peer = await host.dial(f"127.0.0.1:{worker_port}")

        async def opener() -> tuple[asyncio.StreamReader, Any]:
            return await host.open_stream(peer, MessageType.OPEN_TUNNEL, b'{"service":"rpc"}')

        listener = TunnelListener(opener, transforms=transforms)
        await listener.start()
        yield Tunnel(listener, worker, host, handled)
    finally:
        if listener is not None:
            await listener.close()
        await host.close()
        await worker.close()


@contextlib.asynccontextmanager
async def tcp_service(handler: Service) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def until_idle(listener: TunnelListener) -> None:
    """Waits until no bridge is left (callers bound it with a timeout)."""
    while listener.active:  # noqa: ASYNC110 (polls the listener's own count)
        await asyncio.sleep(0.01)


async def exchange(port: int, payload: bytes, chunk: int = 100_000) -> bytes:
    """Sends payload, half-closes, and returns everything read until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), chunk):
            writer.write(view[i : i + chunk])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        got = await reader.read(-1)
        await sender
    finally:
        writer.close()
    return got


async def test_megabytes_both_ways_arrive_intact() -> None:
    payload = os.urandom(4 << 20)
    async with tcp_service(echo) as svc, tunnel_to(svc) as t:
        got = await exchange(t.port, payload)
        assert len(got) == len(payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert t.listener.bytes_up == len(payload) and t.listener.bytes_down == len(payload)
        assert t.listener.connections == 1


async def test_twenty_concurrent_connections() -> None:
    payloads = [os.urandom(50_000 + i * 7_000) for i in range(20)]
    async with tcp_service(echo) as svc, tunnel_to(svc) as t:
        results = await asyncio.gather(*(exchange(t.port, p, chunk=16_384) for p in payloads))
        assert [hashlib.sha256(r).digest() for r in results] == [
            hashlib.sha256(p).digest() for p in payloads
        ]
        assert t.listener.connections == 20 and len(t.worker_handlers) == 20
        assert t.listener.bytes_up == t.listener.bytes_down == sum(map(len, payloads))
        async with asyncio.timeout(10):
            await until_idle(t.listener)


async def test_half_close_keeps_the_other_direction_open() -> None:
    payload = os.urandom(3 << 20)
    async with tcp_service(digest_after_eof) as svc, tunnel_to(svc) as t:
        got = await exchange(t.port, payload)
        # The service answered only after it saw our EOF through the tunnel.
        assert got[:32] == hashlib.sha256(payload).digest()
        assert got[32:] == bytes(2 << 20)


async def test_service_closing_reaches_the_client_as_eof() -> None:
    async with tcp_service(hang_up_after_hello) as svc, tunnel_to(svc) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(b"hello")
        async with asyncio.timeout(10):
            assert await reader.read(-1) == b"bye"  # then EOF
        writer.close()  # our side ends too: the bridge is gone
        async with asyncio.timeout(10):
            await until_idle(t.listener)


async def test_service_reset_tears_down_the_client_side() -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        writer.close()  # RST

    async with tcp_service(reset_after_hello) as svc, tunnel_to(svc) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(b"hello")
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                assert await reader.read(-1) == b""
            await until_idle(t.listener)
        writer.close()


async def test_dead_service_closes_the_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with tunnel_to(dead_port) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(b"hello")
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                assert await reader.read(-1) == b""
        writer.close()


async def test_listener_close_tears_down_bridged_connections() -> None:
    async with tcp_service(echo) as svc, tunnel_to(svc) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await t.listener.close()
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                assert await reader.read(-1) == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", t.port)


async def test_worker_going_away_tears_down_the_client_side() -> None:
    async with tcp_service(echo) as svc, tunnel_to(svc) as t:
        reader, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await t.worker.close()
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                assert await reader.read(-1) == b""
            await until_idle(t.listener)
        writer.close()


async def test_client_abort_tears_down_the_service_side() -> None:
    service_saw_end = asyncio.Event()

    async def wait_for_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        service_saw_end.set()
        writer.close()

    async with tcp_service(wait_for_end) as svc, tunnel_to(svc) as t:
        _, writer = await asyncio.open_connection("127.0.0.1", t.port)
        writer.write(b"some bytes")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        writer.close()  # RST
        async with asyncio.timeout(10):
            await service_saw_end.wait()


async def test_transforms_see_every_byte_in_order_and_can_answer_back() -> None:
    seen: list[bytes] = []

    def up(data: bytes) -> tuple[list[bytes], list[bytes]]:
        seen.append(data)
        # Forward everything; answer a marker byte back to the client ourselves.
        return [data], [b"!"] if data.endswith(b"?") else []

    def down(data: bytes) -> tuple[list[memoryview], list[bytes]]:
        return [memoryview(data)], []

    payload = os.urandom(1 << 20).replace(b"!", b"#").replace(b"?", b"#") + b"?"
    async with tcp_service(echo) as svc, tunnel_to(svc, transforms=lambda: (up, down)) as t:
        got = await exchange(t.port, payload)
    assert b"".join(seen) == payload
    # The sidecar's own reply can arrive anywhere among the echoed bytes, but exactly once.
    assert len(got) == len(payload) + 1 and got.replace(b"!", b"", 1) == payload


async def test_tunnels_only_use_loopback() -> None:
    async def opener() -> tuple[asyncio.StreamReader, Any]:
        raise AssertionError

    with pytest.raises(ValueError, match="loopback"):
        await TunnelListener(opener).start("0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        await bridge_to_local(asyncio.StreamReader(), None, "10.0.0.1", 1)  # type: ignore[arg-type]
