"""TCP ⇄ QUIC-stream bridge for llama.cpp RPC traffic.

Public API::

    listener = TunnelListener(open_stream)   # open_stream: async () -> (reader, writer)
    port = await listener.start("127.0.0.1", 0)
    listener.port; listener.bytes_up; listener.bytes_down; listener.connections; listener.active
    await listener.close()                   # stops listening, tears down every bridge

    await bridge_to_local(reader, writer, "127.0.0.1", rpc_port)   # worker side
    await bridge(a_reader, a_writer, b_reader, b_writer)            # the generic pair of pumps

Host side: :class:`TunnelListener` listens on the loopback interface and
bridges each accepted TCP connection (llama-server's RPC client) to a new
QUIC stream to one worker, obtained from ``open_stream`` (which sends the
OpenTunnel frame). Worker side: :func:`bridge_to_local` connects such a
stream to the worker's own rpc-server on 127.0.0.1.

Each direction is a :class:`Pump`: read a chunk, transform it (if the
tunnel is protocol-aware), write the result, ``await drain()`` -- so a slow side slows the
other down (backpressure both ways). EOF on one direction is forwarded as a
half-close (``write_eof``) and the other direction keeps flowing until it
ends too; an error on either side cancels both pumps and closes both ends.

Protocol-aware tunnels pass ``transforms``: a factory called once per
connection that returns the two directions' :data:`Transform` functions.
Each takes the chunk just read (the stream in order, in arbitrary chunks;
it may buffer) and returns what to forward and what to send *back* on the
other direction (replies the sidecar answers itself, such as llama.cpp RPC
commands answered from the local model index). Chunks may be memoryviews
(zero-copy slices of a mapped model file). A transform that raises tears
the bridge down like any other error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

CHUNK = 256 << 10
DRAIN_EVERY = 4 << 20
OPEN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0


class StreamWriterLike(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...
    async def wait_closed(self) -> None: ...


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, Any]]]


def _require_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # rpc-server has no authentication: the QUIC tunnel must be the only way in.
        raise ValueError(f"tunnels only use loopback addresses, not {host!r}")


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


Chunk = bytes | memoryview
# One direction of a protocol-aware tunnel: chunk read → (to forward, to send back).
Transform = Callable[[bytes], tuple[Sequence[Chunk], Sequence[Chunk]]]
TransformFactory = Callable[[], tuple[Transform, Transform]]


class Pump:
    """Copies one direction of a bridge and counts the bytes it wrote."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: StreamWriterLike,
        *,
        name: str,
        on_bytes: Callable[[int], None] | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.name = name
        self.on_bytes = on_bytes
        self.transform = transform
        self.bytes = 0
        self.peer: Pump | None = None  # the other direction, set by bridge()

    def send(self, data: Chunk) -> None:
        """Write to this pump's output (``peer`` uses it to send replies back)."""
        if not data:
            return
        self.bytes += len(data)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        self.writer.write(data)  # type: ignore[arg-type]

    async def run(self) -> None:
        while True:
            data = await self.reader.read(CHUNK)
            if not data:
                break
            if self.transform is None:
                self.send(data)
            else:
                forward, back = self.transform(data)
                # Replies go back before anything awaits: their order against the
                # other direction's bytes is decided here.
                if back:
                    assert self.peer is not None
                    for chunk in back:
                        self.peer.send(chunk)
                unsent = 0
                for chunk in forward:
                    self.send(chunk)
                    unsent += len(chunk)
                    if unsent >= DRAIN_EVERY:
                        # A weight reference expands to up to a whole tensor of mapped
                        # pages: wait for the consumer rather than copy it all into buffers.
                        await self.writer.drain()
                        unsent = 0
            await self.writer.drain()
        if not self.writer.is_closing():
            self.writer.write_eof()


async def _close_writer(writer: StreamWriterLike) -> None:
    with contextlib.suppress(Exception):
        writer.close()
    if isinstance(writer, asyncio.StreamWriter):
        # Only TCP needs this: a QUIC stream's reset is handled by its connection.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


async def bridge(
    a_reader: asyncio.StreamReader,
    a_writer: StreamWriterLike,
    b_reader: asyncio.StreamReader,
    b_writer: StreamWriterLike,
    *,
    transforms: TransformFactory | None = None,
    on_up: Callable[[int], None] | None = None,
    on_down: Callable[[int], None] | None = None,
) -> None:
    """Pump a→b ("up") and b→a ("down") until both ended; any failure tears both down."""
    t_up, t_down = transforms() if transforms is not None else (None, None)
    up = Pump(a_reader, b_writer, name="up", on_bytes=on_up, transform=t_up)
    down = Pump(b_reader, a_writer, name="down", on_bytes=on_down, transform=t_down)
    up.peer, down.peer = down, up
    tasks = [asyncio.ensure_future(up.run()), asyncio.ensure_future(down.run())]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t.exception() is not None]
            if failed:
                log.debug("tunnel pump failed: %r", failed[0].exception())
                break
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await _close_writer(a_writer)
        await _close_writer(b_writer)


class TunnelListener:
    """A loopback listener whose connections are bridged to streams from ``open_stream``."""

    def __init__(self, open_stream: Opener, *, transforms: TransformFactory | None = None) -> None:
        self._open_stream = open_stream
        self._transforms = transforms
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.port = 0
        self.bytes_up = 0  # TCP client → tunnel (host → worker)
        self.bytes_down = 0  # tunnel → TCP client (worker → host)
        self.connections = 0  # accepted so far

    @property
    def active(self) -> int:
        return len(self._conns)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        _require_loopback(host)
        self._server = await asyncio.start_server(self._accept, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _count_up(self, n: int) -> None:
        self.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.bytes_down += n

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        self.connections += 1
        # The bridge runs in a task of its own: close() cancels that one, while asyncio's
        # connection task ends normally (3.11 logs an error for a cancelled one).
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)
        await asyncio.wait([task])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                q_reader, q_writer = await self._open_stream()
        except Exception as exc:
            log.warning("tunnel: cannot open a stream to the worker: %s", exc)
            await _close_writer(writer)
            return
        except asyncio.CancelledError:
            await _close_writer(writer)
            raise
        await bridge(
            reader,
            writer,
            q_reader,
            q_writer,
            transforms=self._transforms,
            on_up=self._count_up,
            on_down=self._count_down,
        )

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        conns = list(self._conns)
        for task in conns:
            task.cancel()
        for task in conns:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def bridge_to_local(
    reader: asyncio.StreamReader,
    writer: StreamWriterLike,
    host: str,
    port: int,
    *,
    transforms: TransformFactory | None = None,
) -> None:
    """Worker side: connect a tunnel stream to a local service (rpc-server) and pump."""
    _require_loopback(host)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            l_reader, l_writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        log.warning("tunnel: local service %s:%d unreachable: %s", host, port, exc)
        await _close_writer(writer)
        return
    _nodelay(l_writer)
    await bridge(reader, writer, l_reader, l_writer, transforms=transforms)
