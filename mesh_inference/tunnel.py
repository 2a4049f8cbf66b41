"""TCP ⇄ QUIC-stream bridge for llama.cpp RPC traffic.

Host side: :class:`TunnelListener` listens on 127.0.0.1 and bridges each
accepted TCP connection (llama-server's RPC client) to a new QUIC stream to
one worker. Worker side: :func:`bridge_to_local` connects such a stream to
the worker's own rpc-server on 127.0.0.1.

Both directions are a :class:`Pump`: read a chunk, optionally look at it
(``inspect`` — the hook where a later version parses RPC frames to cache or
short-cut commands), write it, and await ``drain()`` so a slow side slows the
other (backpressure). EOF on one direction is forwarded as a half-close
(``write_eof``); the bridge ends when both directions ended, or at once when
either fails, and then closes both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

CHUNK = 256 << 10


class WriterLike(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, Any]]]


class Pump:
    """Copies one direction of a bridge and counts the bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: WriterLike, name: str) -> None:
        self.reader, self.writer, self.name = reader, writer, name
        self.bytes = 0
        self.on_bytes: Callable[[int], None] | None = None

    def inspect(self, data: bytes) -> bytes:
        """Hook for protocol-aware tunnels (RPC frame parsing); identity for now."""
        return data

    async def run(self) -> None:
        while True:
            data = await self.reader.read(CHUNK)
            if not data:
                break
            data = self.inspect(data)
            self.bytes += len(data)
            if self.on_bytes is not None:
                self.on_bytes(len(data))
            self.writer.write(data)
            await self.writer.drain()
        if not self.writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()


async def bridge(
    a_reader: asyncio.StreamReader,
    a_writer: WriterLike,
    b_reader: asyncio.StreamReader,
    b_writer: WriterLike,
    *,
    on_up: Callable[[int], None] | None = None,
    on_down: Callable[[int], None] | None = None,
) -> None:
    """Pump a→b and b→a until both ended; any failure tears both down."""
    up, down = Pump(a_reader, b_writer, "up"), Pump(b_reader, a_writer, "down")
    up.on_bytes, down.on_bytes = on_up, on_down
    tasks = [asyncio.ensure_future(up.run()), asyncio.ensure_future(down.run())]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    log.debug("tunnel pump failed: %r", exc)
                    for other in pending:
                        other.cancel()
                    pending = set()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for w in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                w.close()


class TunnelListener:
    """127.0.0.1 listener whose connections are bridged to streams from ``open_stream``."""

    def __init__(self, open_stream: Opener) -> None:
        self._open_stream = open_stream
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0
        self.bytes_up = 0  # TCP client → tunnel (host → worker)
        self.bytes_down = 0
        self.connections = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _count_up(self, n: int) -> None:
        self.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.bytes_down += n

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.connections += 1
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                q_reader, q_writer = await self._open_stream()
            except Exception as exc:
                log.warning("tunnel: cannot open a stream to the worker: %s", exc)
                writer.close()
                return
            await bridge(reader, writer, q_reader, q_writer,
                         on_up=self._count_up, on_down=self._count_down)
        finally:
            self._conns.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def bridge_to_local(
    reader: asyncio.StreamReader, writer: WriterLike, host: str, port: int
) -> None:
    """Worker side: connect a tunnel stream to the local rpc-server and pump."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError("tunnels only ever reach services on the loopback interface")
    try:
        l_reader, l_writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        log.warning("tunnel: local service %s:%d unreachable: %s", host, port, exc)
        writer.close()
        return
    sock = l_writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await bridge(reader, writer, l_reader, l_writer)
