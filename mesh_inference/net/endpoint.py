"""The QUIC endpoint: the asyncio edge around PeerSession (core/session.py).

Public API::

    ep = MeshEndpoint(identity, mesh, host="0.0.0.0", port=0, max_datagram_size=1452,
                      idle_timeout=15.0, handshake_timeout=5.0, max_handshaking=64,
                      on_peer_connected=f(PeerConnection),
                      on_peer_lost=f(peer_id, reason),
                      on_control_frame=f(peer_id, Frame),
                      on_stream=async f(peer_id, first_frame, StreamReader, QuicStreamWriter))
    port = await ep.start()                          # the bound UDP port
    peer_id = await ep.dial("10.0.0.2:4433", timeout=5.0)   # raises DialError
    ep.send_control(peer_id, MessageType.HEARTBEAT, payload)  # raises UnknownPeer
    reader, writer = await ep.open_stream(peer_id, MessageType.OPEN_TUNNEL, payload)
    reader, writer = await ep.open_stream_raw(peer_id)   # the caller writes the first frame
    ep.disconnect(peer_id, reason); ep.peers(); ep.peer_connection(peer_id) -> PeerConnection
    PeerConnection(peer_id, pubkey_der, remote_address, dialed_by_us)
    ep.rtt(peer_id) -> float | None                  # smoothed RTT in seconds (QUIC PINGs)
    await ep.close()

Everything about a connection -- QUIC, handshake, streams, credit,
deadlines -- is the sans-I/O ``PeerSession``; this module only moves
datagrams, feeds ``time.monotonic()`` in (asyncio's ``loop.time()``; not
uvloop's, which ticks per millisecond), arms one timer per session and turns
session events into callbacks and (StreamReader, QuicStreamWriter) pairs.

Per round trip, the edge does as little as it can around aioquic: every
datagram waiting on the socket is read per readiness event and each session
pumped once per such batch (one transmit, one timer check, one wake-up of a
stream reader for a whole burst); the event-loop timer is re-armed only
when the session's deadline moves earlier (every packet sent pushes the loss
timer later: a timer that fires early just re-arms).

One UDP socket both accepts and dials (peers see a single address per
node, one port to open in a firewall); datagrams are routed to sessions by
destination connection id. Only a dial to another address family than the
socket's gets a socket of its own. At most ``max_handshaking`` connections
may be unauthenticated at once; Initial packets beyond that are dropped.

One authenticated connection per peer. When both sides dialed, the
connection dialed by the smaller node id is kept (or the new one, if the
old one has been silent for ``STALE_AFTER``: the peer restarted); the other
refuses streams and is closed as a duplicate. A peer that closes our kept
connection as *its* duplicate is only reported lost if no other connection
to it authenticates within ``handshake_timeout``.

Callbacks run from the event loop in the order things happened, never
re-entrantly from inside a call into the endpoint (e.g. ``disconnect()``
reports ``on_peer_lost`` a moment later). A peer's bad behaviour closes
that connection with the reason logged; it never breaks the endpoint.

``QuicStreamWriter`` mimics asyncio.StreamWriter: ``write`` sends at once
(llama.cpp RPC is latency-bound) as far as the stream's credit allows and
queues the rest; ``drain`` waits until nothing is queued (the receiver
consumed enough); ``write_eof`` sends FIN after the queue (half-close);
``close`` resets the stream unless FIN was asked for; ``wait_closed`` waits
until the stream is finished both ways. Writing to a stream whose
connection or peer went away raises ConnectionResetError. Readers grant
credit as the application reads, so a peer can make us buffer at most
``STREAM_WINDOW`` per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from mesh_inference.core import session as s
from mesh_inference.core.dcf import Frame, MessageType
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.core.jointoken import InvalidJoinToken, format_addr, parse_addr
from mesh_inference.core.quicstack import (
    SMALLEST_INITIAL,
    NetworkAddress,
    QuicConnection,
    parse_destination,
)
from mesh_inference.core.session import (
    ALPN,
    CID_LENGTH,
    ERR_AUTH,
    ERR_DUPLICATE,
    ERR_INTERNAL,
    ERR_NONE,
    ERR_PROTOCOL,
    HANDSHAKE_TIMEOUT,
    STREAM_WINDOW,
    PeerSession,
)

__all__ = [
    "ALPN",
    "ERR_AUTH",
    "ERR_DUPLICATE",
    "ERR_INTERNAL",
    "ERR_NONE",
    "ERR_PROTOCOL",
    "HANDSHAKE_TIMEOUT",
    "STREAM_WINDOW",
    "DialError",
    "MeshEndpoint",
    "PeerConnection",
    "QuicStreamWriter",
    "UnknownPeer",
]

log = logging.getLogger(__name__)

MAX_HANDSHAKING = 64
STALE_AFTER = 3.0
SOCKET_BUFFER = 4 << 20
RECV_BATCH = 64  # datagrams read per readiness event before the connections are pumped
RECV_SIZE = 65535
SEND_BACKLOG = 1024  # datagrams held while the kernel's send buffer is full

# The clock fed to every session: asyncio's loop.time() is this same clock, while
# uvloop's ticks once per millisecond, which stalls aioquic's pacer.
_clock = time.monotonic


class DialError(ConnectionError):
    """A dial failed: unreachable, timed out, refused, or the peer failed authentication."""


class _Superseded(DialError):
    """The peer closed our dialed connection as a duplicate before it authenticated here:
    both sides dialed at once, and the peer keeps the other connection."""

    def __init__(self, reason: str, peer_id: str | None) -> None:
        super().__init__(reason)
        self.peer_id = peer_id


class UnknownPeer(KeyError):
    """No open connection to that peer."""


@dataclass(frozen=True)
class PeerConnection:
    peer_id: str
    pubkey_der: bytes  # the key the peer proved in the handshake
    remote_address: str  # "host:port" / "[v6]:port"
    dialed_by_us: bool


StreamHandler = Callable[[str, Frame, asyncio.StreamReader, "QuicStreamWriter"], Awaitable[None]]


class _CreditReader(asyncio.StreamReader):
    """A StreamReader that reports what the application took, so the sender gets credit."""

    def __init__(self, on_consumed: Callable[[int], None]) -> None:
        super().__init__()
        self._on_consumed = on_consumed
        self._depth = 0  # read(-1) calls read(n): count the outermost call only

    def _took(self, n: int) -> None:
        if self._depth == 0 and n:
            self._on_consumed(n)

    async def _count(self, read: Awaitable[bytes]) -> bytes:
        # ``read`` is a coroutine of the base class; it runs only once awaited here.
        self._depth += 1
        taken = 0
        try:
            data = await read
            taken = len(data)
            return data
        except asyncio.IncompleteReadError as exc:
            taken = len(exc.partial)
            raise
        finally:
            self._depth -= 1
            self._took(taken)

    async def read(self, n: int = -1) -> bytes:
        return await self._count(super().read(n))

    async def readexactly(self, n: int) -> bytes:
        return await self._count(super().readexactly(n))

    async def readuntil(self, separator: Any = b"\n") -> bytes:  # bytes, or a tuple of them
        return await self._count(super().readuntil(separator))

    async def readline(self) -> bytes:
        return await self._count(super().readline())


class QuicStreamWriter:
    """asyncio.StreamWriter's interface over one QUIC stream, with credit-based backpressure."""

    def __init__(self, conn: _Conn, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._fin_sent = False
        self._closed = False
        self._peer_stopped = False
        self._waiters: list[asyncio.Future[None]] = []

    def _raise_if_unwritable(self) -> None:
        if self._conn.session.closed:
            raise ConnectionResetError(f"connection closed: {self._conn.session.close_reason}")
        if self._peer_stopped:
            raise ConnectionResetError("the peer stopped reading this stream")
        if self._closed:
            raise ConnectionResetError("stream is closed")
        if self._fin_sent:
            raise ConnectionResetError("stream was half-closed (write_eof)")

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_if_unwritable()
        if data:
            self._conn.session.send_data(self.stream_id, bytes(data))
            self._conn.pump()

    def blocked_bytes(self) -> int:
        """Bytes written but waiting for the receiver's credit."""
        return self._conn.session.blocked_bytes(self.stream_id)

    async def drain(self) -> None:
        while True:
            if self._conn.session.closed or self._peer_stopped:
                self._raise_if_unwritable()
            if self._closed or self.blocked_bytes() == 0:
                return
            await self._wait()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._fin_sent or self._closed or self._peer_stopped or self._conn.session.closed:
            return
        self._fin_sent = True
        with contextlib.suppress(ConnectionError):
            self._conn.session.end_stream(self.stream_id)
        self._conn.pump()

    def is_closing(self) -> bool:
        return self._closed or self._peer_stopped or self._conn.session.closed

    def close(self) -> None:
        """Reset the send side unless FIN went out; stop the peer sending if it has not ended."""
        if self._closed:
            return
        self._closed = True
        self._conn.close_stream(self.stream_id)

    async def wait_closed(self) -> None:
        """Wait until the stream is finished both ways (or the connection ended)."""
        while not self._conn.session.closed and self._conn.session.has_stream(self.stream_id):
            await self._wait()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "stream_id":
            return self.stream_id
        if name == "peername":
            return self._conn.remote_address
        if name == "peer_id":
            return self._conn.peer.peer_id if self._conn.peer else default
        return default


@dataclass
class _StreamIO:
    reader: _CreditReader
    writer: QuicStreamWriter
    recv_done: bool = False  # FIN or reset received


class _Conn:
    """The asyncio side of one PeerSession: socket, timer, stream objects, dial future."""

    def __init__(
        self, endpoint: MeshEndpoint, session: PeerSession, sock: _UdpSocket, remote: str
    ) -> None:
        self.endpoint = endpoint
        self.session = session
        self.sock = sock
        self.remote_address = remote
        self.loop = asyncio.get_running_loop()
        self.last_rx = _clock()
        self.peer: PeerConnection | None = None
        self.streams: dict[int, _StreamIO] = {}
        self.authenticated: asyncio.Future[PeerConnection] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None  # when the armed timer fires (<= the session's)
        self._pumping = False
        self.dropped = False

    @property
    def dialer(self) -> bool:
        return self.session.is_dialer

    def describe(self) -> str:
        return f"{self.peer.peer_id} ({self.remote_address})" if self.peer else self.remote_address

    def receive(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        """Feed one datagram; the socket pumps once after its whole batch."""
        self.last_rx = now
        self.session.receive_datagram(data, addr, now)

    def _on_timer(self) -> None:
        now = max(self._timer_at or 0.0, _clock())
        self._timer = self._timer_at = None
        self.session.handle_timer(now)
        self.pump()

    def pump(self) -> None:
        """Send what the session has to send, act on its events, re-arm its timer."""
        if self._pumping:  # an event handler called back in: the outer loop sends it
            return
        self._pumping = True
        try:
            # Events first, so that what handlers queue goes out in the same batch;
            # sending can raise events again (new connection ids).
            while True:
                while (event := self.session.next_event()) is not None:
                    self.endpoint._on_event(self, event)
                datagrams = self.session.datagrams_to_send(_clock())
                if datagrams:
                    self.sock.send_all(datagrams)
                event = self.session.next_event()
                if event is None:
                    break
                self.endpoint._on_event(self, event)
        finally:
            self._pumping = False
        if self.dropped:
            return
        if self.session.terminated:
            self.endpoint._drop(self)
            return
        timer_at = self.session.get_timer()
        if timer_at is None:
            self.stop_timer()
        elif self._timer is None or timer_at < self._timer_at:  # type: ignore[operator]
            # Re-armed only when the deadline moved earlier: a later one (every packet
            # sent pushes the loss timer) is taken up when the armed timer fires.
            self.stop_timer()
            self._timer_at = timer_at
            self._timer = self.loop.call_later(max(0.0, timer_at - _clock()), self._on_timer)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None

    def fail(self, code: int, reason: str, *, level: int = logging.WARNING) -> None:
        if self.session.closed:
            return
        log.log(level, "closing connection to %s: %s", self.describe(), reason)
        self.session.close(reason, code)
        self.pump()

    def new_stream(self, sid: int) -> tuple[_CreditReader, QuicStreamWriter]:
        def consumed(n: int) -> None:
            if not self.session.closed and self.session.consumed(sid, n):
                self.pump()  # a Credit frame is due

        io = _StreamIO(_CreditReader(consumed), QuicStreamWriter(self, sid))
        self.streams[sid] = io
        return io.reader, io.writer

    def close_stream(self, sid: int) -> None:
        io = self.streams.get(sid)
        if io is not None and not io.recv_done:
            io.recv_done = True
            io.reader.feed_eof()  # like a closed asyncio transport
        if not self.session.closed:
            self.session.close_stream(sid)
            self.pump()


class _UdpSocket:
    """One UDP socket; routes datagrams to connections by destination connection id.

    Reads every datagram waiting (up to ``RECV_BATCH``) per readiness event and
    pumps each connection once after the batch, instead of asyncio's one datagram
    per event-loop turn: one transmit, one timer check and one wake-up of a
    stream's reader per batch, so a burst reaches the application as one chunk.
    """

    def __init__(self, endpoint: MeshEndpoint, sock: socket.socket, *, accept: bool) -> None:
        self._endpoint = endpoint
        self._accept = accept
        self._sock: socket.socket | None = sock
        self._loop = asyncio.get_running_loop()
        self._backlog: deque[tuple[bytes, NetworkAddress]] = deque()
        self._buf = memoryview(bytearray(RECV_SIZE))
        self.by_cid: dict[bytes, _Conn] = {}
        self.conns: set[_Conn] = set()
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self.family = sock.family
        self.sockname = sock.getsockname()
        self._loop.add_reader(sock.fileno(), self._read_ready)

    @classmethod
    async def bind(cls, endpoint: MeshEndpoint, host: str, port: int, *, accept: bool,
                   family: int = 0) -> _UdpSocket:  # fmt: skip
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, family=family, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot bind {host}:{port}")
        fam, kind, proto, _, addr = infos[0]
        sock = socket.socket(fam, kind, proto)
        try:
            sock.bind(addr)
            return cls(endpoint, sock, accept=accept)
        except BaseException:
            sock.close()
            raise

    def _read_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        touched: list[_Conn] = []
        now = _clock()
        buf = self._buf
        for _ in range(RECV_BATCH):
            try:
                # Into one buffer, then an exact-size copy: recvfrom(65535) would allocate
                # 64 KiB per datagram and shrink it, fragmenting the heap.
                n, addr = sock.recvfrom_into(buf)
                data = bytes(buf[:n])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ICMP errors (port unreachable, ...): the sessions' own timers decide.
                log.debug("udp error: %s", exc)
                break
            conn = self._route(data, addr)
            if conn is not None:
                conn.receive(data, addr, now)
                if conn not in touched:
                    touched.append(conn)
        for conn in touched:
            if not conn.dropped:
                conn.pump()

    def _route(self, data: bytes, addr: NetworkAddress) -> _Conn | None:
        header = parse_destination(data, CID_LENGTH)
        if header is None:
            return None
        conn = self.by_cid.get(header.destination_cid)
        if conn is None:
            if not (self._accept and header.is_initial and len(data) >= SMALLEST_INITIAL):
                return None
            conn = self._endpoint._accept(self, header.destination_cid, addr)
        return conn

    def send_all(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._backlog:
            self._queue(datagrams)
            return
        for i, (data, addr) in enumerate(datagrams):
            try:
                sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                self._queue(datagrams[i:])
                self._loop.add_writer(sock.fileno(), self._write_ready)
                return
            except OSError as exc:
                log.debug("udp send to %s: %s", addr, exc)

    def _queue(self, datagrams: list[tuple[bytes, NetworkAddress]]) -> None:
        # The kernel buffer is full: keep a bounded backlog; beyond it, a datagram is lost
        # like on any network, and QUIC's loss recovery resends what it carried.
        room = SEND_BACKLOG - len(self._backlog)
        self._backlog.extend(datagrams[: max(0, room)])

    def _write_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while self._backlog:
            data, addr = self._backlog[0]
            try:
                sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp send to %s: %s", addr, exc)
            self._backlog.popleft()
        self._loop.remove_writer(sock.fileno())

    def add(self, conn: _Conn, cids: list[bytes]) -> None:
        self.conns.add(conn)
        for cid in cids:
            self.by_cid[cid] = conn

    def remove(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        for cid in [c for c, p in self.by_cid.items() if p is conn]:
            del self.by_cid[cid]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            if self._backlog:
                self._loop.remove_writer(sock.fileno())
                self._backlog.clear()
            sock.close()


class MeshEndpoint:
    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshCredentials,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        max_datagram_size: int = 1452,
        idle_timeout: float = 15.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_handshaking: int = MAX_HANDSHAKING,
        on_peer_connected: Callable[[PeerConnection], None],
        on_peer_lost: Callable[[str, str], None],
        on_control_frame: Callable[[str, Frame], None],
        on_stream: StreamHandler,
    ) -> None:
        if not SMALLEST_INITIAL <= max_datagram_size <= 65527:
            raise ValueError(
                f"max_datagram_size must be in {SMALLEST_INITIAL}-65527"
            )
        if idle_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if max_handshaking < 1:
            raise ValueError("max_handshaking must be at least 1")
        self.identity = identity
        self.mesh = mesh
        self._host, self._port = host, port
        self.handshake_timeout = handshake_timeout
        self.max_handshaking = max_handshaking
        self._on_peer_connected = on_peer_connected
        self._on_peer_lost = on_peer_lost
        self._on_control_frame = on_control_frame
        self._on_stream = on_stream
        self._client_config = s.quic_configuration(
            identity, is_client=True, max_datagram_size=max_datagram_size,
            idle_timeout=idle_timeout,
        )
        self._server_config = s.quic_configuration(
            identity, is_client=False, max_datagram_size=max_datagram_size,
            idle_timeout=idle_timeout,
        )
        self._sock: _UdpSocket | None = None
        self._family = socket.AF_INET
        self._extra_socks: set[_UdpSocket] = set()
        self._peers: dict[str, _Conn] = {}
        self._conns: set[_Conn] = set()
        # Peers whose kept connection they closed as a duplicate: lost unless replaced.
        self._orphans: dict[str, asyncio.TimerHandle] = {}
        # dial() calls waiting for a peer to authenticate on another connection.
        self._peer_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._callbacks: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._callbacks_scheduled = False
        self._closing = False
        self.port = 0

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    async def start(self) -> int:
        sock = await _UdpSocket.bind(self, self._host, self._port, accept=True)
        self._sock = sock
        self._family = sock.family
        self.port = int(sock.sockname[1])
        return self.port

    # -- callbacks, delivered in order from the loop
    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        self._callbacks.append((fn, args))
        if not self._callbacks_scheduled:
            self._callbacks_scheduled = True
            asyncio.get_running_loop().call_soon(self._run_callbacks)

    def _run_callbacks(self) -> None:
        self._callbacks_scheduled = False
        while self._callbacks:
            fn, args = self._callbacks.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("mesh endpoint callback %s failed", getattr(fn, "__name__", fn))

    # -- sessions
    def _new_conn(self, quic: QuicConnection, sock: _UdpSocket, remote: str) -> _Conn:
        session = PeerSession(
            quic, self.identity, self.mesh, now=_clock(),
            handshake_timeout=self.handshake_timeout, wall_offset=time.time() - _clock(),
        )
        conn = _Conn(self, session, sock, remote)
        self._conns.add(conn)
        return conn

    def _accept(self, sock: _UdpSocket, dcid: bytes, addr: NetworkAddress) -> _Conn | None:
        handshaking = sum(1 for c in self._conns if not c.session.authenticated)
        if self._closing or handshaking >= self.max_handshaking:
            return None
        quic = QuicConnection(
            configuration=self._server_config, original_destination_connection_id=dcid
        )
        conn = self._new_conn(quic, sock, format_addr(addr[0], addr[1]))
        sock.add(conn, [dcid, quic.host_cid])
        return conn

    def _drop(self, conn: _Conn) -> None:
        conn.dropped = True
        conn.stop_timer()
        self._conns.discard(conn)
        conn.sock.remove(conn)
        if conn.sock in self._extra_socks and not conn.sock.conns:
            self._extra_socks.discard(conn.sock)
            conn.sock.close()

    def _on_event(self, conn: _Conn, ev: s.SessionEvent) -> None:
        if isinstance(ev, s.StreamDataReceived):
            io = conn.streams.get(ev.stream_id)
            if io is not None and not io.recv_done:
                if ev.data:
                    io.reader.feed_data(ev.data)
                if ev.end:
                    io.recv_done = True
                    io.reader.feed_eof()
        elif isinstance(ev, s.StreamOpened):
            self._on_stream_opened(conn, ev)
        elif isinstance(ev, s.StreamWritable | s.StreamStoppedByPeer | s.StreamClosed):
            io = conn.streams.get(ev.stream_id)
            if io is not None:
                if isinstance(ev, s.StreamStoppedByPeer):
                    io.writer._peer_stopped = True
                elif isinstance(ev, s.StreamClosed):
                    del conn.streams[ev.stream_id]
                io.writer._wake()
        elif isinstance(ev, s.StreamResetByPeer):
            io = conn.streams.get(ev.stream_id)
            if io is not None and not io.recv_done:
                io.recv_done = True
                io.reader.set_exception(ConnectionResetError("stream reset by the peer"))
        elif isinstance(ev, s.ControlFrameReceived):
            if conn.peer is not None and self._peers.get(conn.peer.peer_id) is conn:
                self._deliver(self._on_control_frame, conn.peer.peer_id, ev.frame)
        elif isinstance(ev, s.ConnectionIdIssued):
            conn.sock.by_cid[ev.connection_id] = conn
        elif isinstance(ev, s.ConnectionIdRetired):
            if conn.sock.by_cid.get(ev.connection_id) is conn:
                del conn.sock.by_cid[ev.connection_id]
        elif isinstance(ev, s.PeerAuthenticated):
            self._on_authenticated(conn, ev)
        elif isinstance(ev, s.SessionClosed):
            self._on_closed(conn, ev)

    def _on_stream_opened(self, conn: _Conn, ev: s.StreamOpened) -> None:
        assert conn.peer is not None
        peer_id = conn.peer.peer_id
        if self._closing or self._peers.get(peer_id) is not conn:
            # A superseded duplicate (or we are shutting down): never reaches the node.
            conn.session.close_stream(ev.stream_id)
            return
        reader, writer = conn.new_stream(ev.stream_id)
        task = asyncio.get_running_loop().create_task(
            self._run_handler(peer_id, ev.first_frame, reader, writer)
        )
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _run_handler(
        self, peer_id: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        try:
            await self._on_stream(peer_id, first, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("stream %d from %s ended: %s", writer.stream_id, peer_id, exc)
        except Exception:
            log.exception("stream handler for %s failed", peer_id)
        finally:
            writer.close()

    def _on_authenticated(self, conn: _Conn, ev: s.PeerAuthenticated) -> None:
        peer = conn.peer = PeerConnection(
            ev.peer_id, ev.pubkey_der, conn.remote_address, conn.dialer
        )
        # Resolved first: if this turns out a duplicate, the peer is still connected.
        if not conn.authenticated.done():
            conn.authenticated.set_result(peer)
        existing = self._peers.get(peer.peer_id)
        if existing is not None:
            # Both sides dialed: both keep the one dialed by the smaller id. An old
            # connection that went silent lost its peer (restarted): take the new one.
            keep_new = _clock() - existing.last_rx > STALE_AFTER or (
                (self.node_id < peer.peer_id) == conn.dialer
            )
            loser = existing if keep_new else conn
            if keep_new:
                self._peers[peer.peer_id] = conn
            loser.session.refuse_streams()
            loser.fail(ERR_DUPLICATE, "duplicate connection", level=logging.INFO)
            return
        self._peers[peer.peer_id] = conn
        for waiter in self._peer_waiters.pop(peer.peer_id, []):
            if not waiter.done():
                waiter.set_result(None)
        orphan = self._orphans.pop(peer.peer_id, None)
        if orphan is not None:
            orphan.cancel()  # the connection the peer kept: for the node, nothing changed
            return
        log.info("authenticated peer %s (%s)", conn.describe(),
                 "dialed" if conn.dialer else "accepted")
        self._deliver(self._on_peer_connected, peer)

    def _on_closed(self, conn: _Conn, ev: s.SessionClosed) -> None:
        reason = ev.reason
        for io in conn.streams.values():
            if not io.recv_done:
                io.recv_done = True
                io.reader.set_exception(ConnectionResetError(f"connection closed: {reason}"))
            io.writer._wake()
        if not conn.authenticated.done():
            error = (
                _Superseded(reason, conn.session.claimed_peer_id)
                if ev.by_peer and ev.code == ERR_DUPLICATE
                else DialError(reason)
            )
            conn.authenticated.set_exception(error)
            conn.authenticated.exception()  # retrieved: dial() reports it, if anyone dialed
        if ev.by_peer and not conn.session.authenticated:
            log.info("connection to %s closed: %s", conn.describe(), reason)
        if conn.peer is None or self._peers.get(conn.peer.peer_id) is not conn:
            return
        peer_id = conn.peer.peer_id
        del self._peers[peer_id]
        if self._closing:
            return
        if ev.by_peer and ev.code == ERR_DUPLICATE and peer_id not in self._orphans:
            # The peer kept our other connection, which should authenticate here soon.
            self._orphans[peer_id] = conn.loop.call_later(
                self.handshake_timeout, self._orphan_lost, peer_id, reason
            )
            return
        self._deliver(self._on_peer_lost, peer_id, reason)

    def _orphan_lost(self, peer_id: str, reason: str) -> None:
        if self._orphans.pop(peer_id, None) is not None and not self._closing:
            self._deliver(self._on_peer_lost, peer_id, reason)

    # -- public API
    async def dial(self, addr: str, timeout: float = 5.0) -> str:  # noqa: ASYNC109
        """Connect and authenticate; returns the peer's node id. Raises DialError."""
        if self._sock is None or self._closing:
            raise DialError("the endpoint is not running")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            host, port = parse_addr(addr)
        except InvalidJoinToken as exc:
            raise DialError(f"dial {addr!r}: {exc}") from None
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, TimeoutError) as exc:
            raise DialError(f"dial {addr}: cannot resolve {host}: {exc}") from None
        if not infos:
            raise DialError(f"dial {addr}: {host} has no address")
        same_family = [info for info in infos if info[0] == self._family]
        sock = self._sock
        if same_family:
            sockaddr = same_family[0][4]
        else:
            family, sockaddr = infos[0][0], infos[0][4]
            any_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
            try:
                sock = await _UdpSocket.bind(self, any_host, 0, accept=False, family=family)
            except OSError as exc:
                raise DialError(f"dial {addr}: {exc}") from None
            self._extra_socks.add(sock)
        quic = QuicConnection(configuration=self._client_config)
        conn = self._new_conn(quic, sock, addr)
        sock.add(conn, [quic.host_cid])
        conn.session.connect(cast(NetworkAddress, sockaddr), _clock())
        conn.pump()
        try:
            peer = await asyncio.wait_for(
                asyncio.shield(conn.authenticated), max(0.0, deadline - loop.time())
            )
        except TimeoutError:
            conn.fail(ERR_AUTH, "dial timed out", level=logging.DEBUG)
            raise DialError(f"dial {addr}: no authenticated answer within {timeout} s") from None
        except _Superseded as exc:
            # Simultaneous dials: the peer keeps the connection it dialed to us. The dial
            # succeeded if that one authenticates here in time.
            if exc.peer_id is None:
                raise DialError(f"dial {addr}: {exc}") from None
            await self._wait_for_peer(exc.peer_id, deadline - loop.time(), addr)
            return exc.peer_id
        except DialError as exc:
            raise DialError(f"dial {addr}: {exc}") from None
        except asyncio.CancelledError:
            conn.fail(ERR_NONE, "dial cancelled", level=logging.DEBUG)
            raise
        return peer.peer_id

    async def _wait_for_peer(self, peer_id: str, timeout: float, addr: str) -> None:  # noqa: ASYNC109
        if peer_id in self._peers:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._peer_waiters.setdefault(peer_id, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, timeout))
        except TimeoutError:
            raise DialError(
                f"dial {addr}: superseded as a duplicate, and the peer's own connection "
                "did not authenticate in time"
            ) from None
        finally:
            waiters = self._peer_waiters.get(peer_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._peer_waiters.pop(peer_id, None)

    def _peer(self, peer_id: str) -> _Conn:
        conn = self._peers.get(peer_id)
        if conn is None or conn.session.closed:
            raise UnknownPeer(peer_id)
        return conn

    def send_control(self, peer_id: str, type: MessageType, payload: bytes) -> None:
        """Send one DCF frame on the peer's control stream, now. Raises UnknownPeer."""
        conn = self._peer(peer_id)
        conn.session.send_control(type, payload)
        conn.pump()

    async def open_stream_raw(self, peer_id: str) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        """A new stream to ``peer_id``; the caller writes its first DCF frame (seq 0)."""
        conn = self._peer(peer_id)
        return conn.new_stream(conn.session.open_stream_raw())

    async def open_stream(
        self, peer_id: str, first_type: MessageType, first_payload: bytes
    ) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        """A new stream whose first frame (OpenTunnel or Task) is already sent."""
        if first_type not in s.STREAM_TYPES:
            raise ValueError(f"a stream cannot start with {first_type.name}")
        conn = self._peer(peer_id)
        pair = conn.new_stream(conn.session.open_stream(first_type, first_payload))
        conn.pump()
        return pair

    def disconnect(self, peer_id: str, reason: str) -> None:
        """Close the connection to ``peer_id``; ``on_peer_lost`` follows with ``reason``."""
        conn = self._peers.get(peer_id)
        if conn is not None:
            conn.fail(ERR_NONE, reason, level=logging.INFO)

    def peers(self) -> list[str]:
        return [pid for pid, c in self._peers.items() if not c.session.closed]

    def peer_connection(self, peer_id: str) -> PeerConnection | None:
        conn = self._peers.get(peer_id)
        return conn.peer if conn is not None and not conn.session.closed else None

    def rtt(self, peer_id: str) -> float | None:
        conn = self._peers.get(peer_id)
        return conn.session.rtt if conn is not None else None

    async def close(self) -> None:
        """Close every connection (peers see "shutting down") and the socket(s)."""
        if self._closing:
            return
        self._closing = True
        for handle in self._orphans.values():
            handle.cancel()
        self._orphans.clear()
        for conn in list(self._conns):
            conn.fail(ERR_NONE, "shutting down", level=logging.DEBUG)
        # CONNECTION_CLOSE datagrams went out synchronously in fail(); stop the timers.
        for conn in list(self._conns):
            self._drop(conn)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)
        for sock in [self._sock, *self._extra_socks]:
            if sock is not None:
                sock.close()
        self._extra_socks.clear()
        self._sock = None
