"""The QUIC endpoint (aioquic): accept and dial peers, authenticate, carry streams.

Public API::

    ep = MeshEndpoint(identity, mesh, host="0.0.0.0", port=0, max_datagram_size=1452,
                      idle_timeout=15.0, handshake_timeout=10.0,
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
    ep.rtt(peer_id) -> float | None                  # smoothed RTT in seconds
    await ep.close()

One UDP socket both accepts and dials (peers see a single address per
node, one port to open in a firewall); datagrams are routed to connections
by their destination connection id. Only a dial to another address family
than the socket's gets a socket of its own.

One authenticated connection per peer. Stream 0 (the dialer's first
bidirectional stream) is the *control stream*: DCF frames, first the
handshake (auth.py), then Heartbeat/Gossip/Goodbye/… passed through
opaquely to ``on_control_frame``. Every other stream starts with one DCF
frame saying what it is (OpenTunnel or Task); the endpoint decodes that
frame and passes it to ``on_stream`` with a reader that yields the bytes
after it. When both sides dialed, the connection dialed by the smaller node
id is kept (or the new one, if the old one has been silent for
``STALE_AFTER``: the peer restarted).

Callbacks run from the event loop in the order things happened, never
re-entrantly from inside a call into the endpoint (e.g. ``disconnect()``
reports ``on_peer_lost`` a moment later). A peer's bad behaviour -- data
streams before authentication, an unknown first frame, a DCF protocol error
on the control stream, a stalled handshake -- closes that connection with
the reason logged; it never breaks the endpoint.

``QuicStreamWriter`` mimics asyncio.StreamWriter: ``write`` sends at once
(llama.cpp RPC is latency-bound), ``drain`` waits while more than
``HIGH_WATER`` bytes are unsent or unacknowledged, ``write_eof`` sends FIN
(half-close), ``close`` resets the stream unless FIN was sent. Writing to a
stream whose connection or peer went away raises ConnectionResetError.
Receive-side memory is not bounded by QUIC flow control (aioquic doubles a
window as data arrives), so stream handlers must keep reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography.hazmat.primitives import serialization

from mesh_inference.core.dcf import (
    HEADER,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameEncoder,
    MessageType,
    ProtocolError,
)
from mesh_inference.core.dcf import encode_frame as _encode_frame
from mesh_inference.core.handshake import AuthFailed, Handshake
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.core.jointoken import InvalidJoinToken, format_addr, parse_addr

log = logging.getLogger(__name__)

ALPN = "mesh-inference/1"
CONTROL_STREAM = 0
# A writer's drain() waits while more than this is unsent or unacknowledged.
HIGH_WATER = 1 << 20
# Initial flow-control windows (aioquic doubles them as data arrives): wide
# enough that model loading is never window-bound.
MAX_DATA = 64 << 20
MAX_STREAM_DATA = 16 << 20
MAX_FIRST_FRAME = 64 << 10
MAX_STREAMS_PER_PEER = 256
# The dialer may see the acceptor's first streams before the Welcome frame
# (different streams are not ordered); it holds at most this much meanwhile.
MAX_PREAUTH_BUFFER = 1 << 20
MAX_HANDSHAKING = 64
HANDSHAKE_TIMEOUT = 10.0
STALE_AFTER = 3.0
SOCKET_BUFFER = 4 << 20
CID_LENGTH = 8
_HANDSHAKE_TYPES = frozenset({MessageType.HELLO, MessageType.PROOF, MessageType.WELCOME})
_STREAM_TYPES = frozenset({MessageType.OPEN_TUNNEL, MessageType.TASK})

# Application error codes in CONNECTION_CLOSE.
ERR_NONE = 0x0
ERR_PROTOCOL = 0x1
ERR_AUTH = 0x2
ERR_DUPLICATE = 0x3
ERR_INTERNAL = 0x4


class DialError(ConnectionError):
    """A dial failed: unreachable, timed out, refused, or the peer failed authentication."""


class UnknownPeer(KeyError):
    """No open connection to that peer."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _spki_of_cert(cert: Any) -> bytes:
    return cast(
        bytes,
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@dataclass(frozen=True)
class PeerConnection:
    peer_id: str
    pubkey_der: bytes  # the key the peer proved in the handshake (= its certificate key)
    remote_address: str  # "host:port" / "[v6]:port"
    dialed_by_us: bool


StreamHandler = Callable[[str, Frame, asyncio.StreamReader, "QuicStreamWriter"], Awaitable[None]]


class QuicStreamWriter:
    """asyncio.StreamWriter's interface over one QUIC stream, with real backpressure."""

    def __init__(self, conn: _PeerProtocol, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._fin_sent = False
        self._closed = False
        self._peer_stopped = False

    def _raise_if_unwritable(self) -> None:
        if self._conn.closing:
            raise ConnectionResetError(f"connection closed: {self._conn.close_reason}")
        if self._peer_stopped:
            raise ConnectionResetError("the peer stopped reading this stream")
        if self._closed:
            raise ConnectionResetError("stream is closed")
        if self._fin_sent:
            raise ConnectionResetError("stream was half-closed (write_eof)")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_if_unwritable()
        if not data:
            return
        try:
            self._conn._quic.send_stream_data(
                self.stream_id, data if isinstance(data, bytes) else bytes(data)
            )
        except (RuntimeError, ValueError) as exc:  # reset underneath us, or no longer writable
            raise ConnectionResetError(f"stream {self.stream_id}: {exc}") from None
        self._conn.transmit()

    def _unacked(self) -> int:
        stream = self._conn._quic._streams.get(self.stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    async def drain(self) -> None:
        while True:
            if self._conn.closing or self._peer_stopped:
                self._raise_if_unwritable()
            if self._closed or self._unacked() <= HIGH_WATER:
                return
            await self._conn.wait_for_acks()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._fin_sent or self._closed or self._peer_stopped or self._conn.closing:
            return
        self._fin_sent = True
        with contextlib.suppress(RuntimeError, ValueError):
            self._conn._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        self._conn.transmit()
        self._conn._maybe_forget(self.stream_id)

    def is_closing(self) -> bool:
        return self._closed or self._peer_stopped or self._conn.closing

    def close(self) -> None:
        """Reset the send side unless FIN went out; stop the peer sending if it has not ended."""
        if self._closed:
            return
        self._closed = True
        self._conn._close_stream(self.stream_id, reset=not self._fin_sent)

    async def wait_closed(self) -> None:
        """Wait until the peer acknowledged our FIN or reset (or the connection ended)."""
        while not self._conn.closing:
            stream = self._conn._quic._streams.get(self.stream_id)
            if stream is None or stream.sender.is_finished:
                return
            await self._conn.wait_for_acks()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "stream_id":
            return self.stream_id
        if name == "peername":
            return self._conn.remote_address
        if name == "peer_id":
            return self._conn.peer.peer_id if self._conn.peer else default
        return default


@dataclass
class _Stream:
    reader: asyncio.StreamReader
    writer: QuicStreamWriter
    recv_done: bool = False  # FIN or reset received


class _PeerProtocol(QuicConnectionProtocol):
    """One connection: handshake on the control stream, then frames and data streams."""

    def __init__(
        self,
        quic: QuicConnection,
        endpoint: MeshEndpoint,
        *,
        dialer: bool,
        remote_address: str,
        sock: _UdpSocket,
    ) -> None:
        super().__init__(quic)
        self.endpoint = endpoint
        self.dialer = dialer
        self.remote_address = remote_address
        self.sock = sock
        self.peer: PeerConnection | None = None
        self.authed = False
        self.closing = False
        self.closed = False
        self.close_reason = ""
        self.superseded = False
        self.last_rx = self._loop.time()
        # The dialer's handshake starts once TLS is up: it needs the certificate key.
        self._handshake: Handshake | None = (
            None if dialer else Handshake(endpoint.identity, endpoint.mesh, is_dialer=False)
        )
        self._ctl_encoder = FrameEncoder()
        self._ctl_decoder = FrameDecoder()
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, bytearray] = {}  # inbound streams before their first frame
        self._pending_ended: set[int] = set()
        self._pending_bytes = 0
        self._done_streams: set[int] = set()  # peer streams we already finished with
        self._ack_waiters: list[asyncio.Future[None]] = []
        self.authenticated: asyncio.Future[PeerConnection] = self._loop.create_future()
        self._auth_timer = self._loop.call_later(
            endpoint.handshake_timeout, self._handshake_timed_out
        )

    def describe(self) -> str:
        return f"{self.peer.peer_id} ({self.remote_address})" if self.peer else self.remote_address

    # -- I/O hooks
    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        if self.closed:
            return
        self.last_rx = self._loop.time()
        super().datagram_received(data, addr)
        self._after_io()

    def _handle_timer(self) -> None:
        super()._handle_timer()
        self._after_io()

    def transmit(self) -> None:
        if self.closed or self.sock.transport is None or self.sock.transport.is_closing():
            return
        super().transmit()

    def _after_io(self) -> None:
        # ACKs carry no event: wake drain() after every datagram.
        waiters, self._ack_waiters = self._ack_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        close_event = getattr(self._quic, "_close_event", None)
        if not self.closing and close_event is not None:
            # The peer closed: report it now, not after aioquic's draining period.
            code = close_event.error_code
            self._begin_close(close_event.reason_phrase or f"closed (error {code})")

    async def wait_for_acks(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._ack_waiters.append(fut)
        await fut

    # -- events
    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event.reason_phrase or f"closed (error {event.error_code})")
            return
        if self.closing:
            return
        try:
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                self._on_stream_reset(event.stream_id)
            elif isinstance(event, events.StopSendingReceived):
                self._on_stop_sending(event.stream_id)
            elif isinstance(event, events.HandshakeCompleted) and self.dialer:
                self._start_dialer_handshake()
        except AuthFailed as exc:
            self.fail(ERR_AUTH, exc.reason)
        except ProtocolError as exc:
            self.fail(ERR_PROTOCOL, f"protocol error: {exc}")
        except Exception as exc:  # a bug must cost one connection, not the endpoint
            log.exception("internal error on connection to %s", self.describe())
            self.fail(ERR_INTERNAL, f"internal error: {exc!r}")

    def _start_dialer_handshake(self) -> None:
        cert = getattr(self._quic.tls, "_peer_certificate", None)
        if cert is None:
            raise AuthFailed("auth failed: the peer presented no TLS certificate")
        self._handshake = Handshake(
            self.endpoint.identity,
            self.endpoint.mesh,
            is_dialer=True,
            peer_tls_pubkey_der=_spki_of_cert(cert),
        )
        self._flush_handshake()

    def _flush_handshake(self) -> None:
        assert self._handshake is not None
        for mtype, payload in self._handshake.pop_frames():
            self._send_control_frame(mtype, payload)

    def _send_control_frame(self, mtype: MessageType, payload: bytes) -> None:
        data = self._ctl_encoder.encode(mtype, payload, _now_us())
        self._quic.send_stream_data(CONTROL_STREAM, data)
        self.transmit()

    def send_control(self, mtype: MessageType, payload: bytes) -> None:
        if self.closing or not self.authed:
            raise ConnectionResetError(f"connection to {self.describe()} is not open")
        if mtype in _HANDSHAKE_TYPES:
            raise ValueError(f"{mtype.name} belongs to the handshake")
        self._send_control_frame(mtype, payload)

    def _on_control_data(self, data: bytes, end: bool) -> None:
        if end:
            raise ProtocolError("the peer closed the control stream")
        for frame in self._ctl_decoder.feed(data):
            if self.closing:
                return
            if not self.authed:
                if self._handshake is None:
                    raise ProtocolError("control frame before the TLS handshake completed")
                self._handshake.handle_frame(frame)
                self._flush_handshake()
                if self._handshake.complete:
                    self._on_authenticated()
            elif frame.type in _HANDSHAKE_TYPES:
                raise ProtocolError(f"{frame.type.name} after the handshake")
            else:
                self.endpoint._deliver_control(self, frame)

    def _on_authenticated(self) -> None:
        hs = self._handshake
        assert hs is not None and hs.peer_id is not None and hs.peer_pubkey_der is not None
        self._auth_timer.cancel()
        self.authed = True
        self.peer = PeerConnection(hs.peer_id, hs.peer_pubkey_der, self.remote_address, self.dialer)
        # Resolved first: if this turns out a duplicate, the peer is still connected.
        if not self.authenticated.done():
            self.authenticated.set_result(self.peer)
        self.endpoint._on_authenticated(self)
        for sid in sorted(self._pending):
            if self.closing:
                break
            self._try_open_stream(sid)

    def _is_local(self, sid: int) -> bool:
        return (sid & 1) == (0 if self.dialer else 1)

    def _on_stream_data(self, sid: int, data: bytes, end: bool) -> None:
        if sid == CONTROL_STREAM:
            self._on_control_data(data, end)
            return
        st = self._streams.get(sid)
        if st is not None:
            if data:
                st.reader.feed_data(data)
            if end:
                st.recv_done = True
                st.reader.feed_eof()
                self._maybe_forget(sid)
            return
        if sid in self._done_streams or self._is_local(sid):
            return  # a stream we already closed: its late data has nowhere to go
        if sid & 2:
            raise ProtocolError("unidirectional streams are not used")
        if not self.authed and not (self.dialer and self._handshake is not None):
            raise ProtocolError("data stream opened before authentication")
        buf = self._pending.get(sid)
        if buf is None:
            if len(self._streams) + len(self._pending) >= MAX_STREAMS_PER_PEER:
                raise ProtocolError(f"more than {MAX_STREAMS_PER_PEER} concurrent streams")
            buf = self._pending[sid] = bytearray()
        buf += data
        self._pending_bytes += len(data)
        if end:
            self._pending_ended.add(sid)
        if self.authed:
            self._try_open_stream(sid)
        elif self._pending_bytes > MAX_PREAUTH_BUFFER:
            raise ProtocolError("too much stream data before the handshake completed")

    def _try_open_stream(self, sid: int) -> None:
        buf = self._pending[sid]
        ended = sid in self._pending_ended
        size = HEADER_SIZE
        if len(buf) >= HEADER_SIZE:
            # Check the length before waiting for the payload: never buffer a hostile size.
            length = int(HEADER.unpack_from(buf)[3])
            if length > MAX_FIRST_FRAME:
                raise ProtocolError(f"first frame of stream {sid} is {length} B")
            size += length
        if len(buf) < size:
            if ended:
                raise ProtocolError(f"stream {sid} ended inside its first frame")
            return
        first = FrameDecoder(max_payload=MAX_FIRST_FRAME).feed(bytes(buf[:size]))[0]
        if first.type not in _STREAM_TYPES:
            raise ProtocolError(f"stream {sid} opened with {first.type.name}")
        del self._pending[sid]
        self._pending_ended.discard(sid)
        self._pending_bytes -= len(buf)
        reader = asyncio.StreamReader()
        writer = QuicStreamWriter(self, sid)
        st = self._streams[sid] = _Stream(reader, writer)
        # The rest belongs to the stream's own protocol (raw tunnel bytes, Body frames).
        if len(buf) > size:
            reader.feed_data(bytes(buf[size:]))
        if ended:
            st.recv_done = True
            reader.feed_eof()
        assert self.peer is not None
        self.endpoint._spawn_handler(self.peer.peer_id, first, reader, writer)

    def _on_stream_reset(self, sid: int) -> None:
        if self._pending.pop(sid, None) is not None:
            self._pending_ended.discard(sid)
            self._done_streams.add(sid)
            return
        st = self._streams.get(sid)
        if st is None:
            if not self._is_local(sid):
                self._done_streams.add(sid)
            return
        if st.recv_done:
            return
        st.recv_done = True
        st.reader.set_exception(ConnectionResetError("stream reset by the peer"))
        self._maybe_forget(sid)

    def _on_stop_sending(self, sid: int) -> None:
        # aioquic answers STOP_SENDING with a reset of our send side by itself.
        st = self._streams.get(sid)
        if st is not None:
            st.writer._peer_stopped = True
            self._maybe_forget(sid)
        self._after_io()

    # -- streams
    def open_stream(self) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        if self.closing or not self.authed:
            raise ConnectionResetError(f"connection to {self.describe()} is not open")
        sid = self._quic.get_next_available_stream_id()
        # Create it now, so the next open_stream() gets another id even before any write.
        self._quic.send_stream_data(sid, b"")
        reader = asyncio.StreamReader()
        writer = QuicStreamWriter(self, sid)
        self._streams[sid] = _Stream(reader, writer)
        return reader, writer

    def _maybe_forget(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None or not st.recv_done:
            return
        w = st.writer
        if w._fin_sent or w._closed or w._peer_stopped:
            self._forget(sid)

    def _forget(self, sid: int) -> None:
        if self._streams.pop(sid, None) is not None and not self._is_local(sid):
            self._done_streams.add(sid)
            if len(self._done_streams) > 1024:
                # Streams aioquic has discarded produce no more events.
                self._done_streams &= set(self._quic._streams)

    def _close_stream(self, sid: int, *, reset: bool) -> None:
        st = self._streams.get(sid)
        if not self.closing:
            with contextlib.suppress(RuntimeError, ValueError):
                if reset:
                    self._quic.reset_stream(sid, ERR_NONE)
                if st is not None and not st.recv_done:
                    self._quic.stop_stream(sid, ERR_NONE)
            self.transmit()
        if st is not None and not st.recv_done:
            st.recv_done = True
            st.reader.feed_eof()  # like a closed asyncio transport
        self._forget(sid)

    # -- closing
    def fail(self, code: int, reason: str, *, level: int = logging.WARNING) -> None:
        if self.closing:
            return
        log.log(level, "closing connection to %s: %s", self.describe(), reason)
        self._begin_close(reason)
        self.close(error_code=code, reason_phrase=reason[:200])

    def _handshake_timed_out(self) -> None:
        if not self.authed:
            self.fail(ERR_AUTH, "handshake timed out")

    def _begin_close(self, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_reason = reason
        self._auth_timer.cancel()
        for st in self._streams.values():
            if not st.recv_done:
                st.recv_done = True
                st.reader.set_exception(ConnectionResetError(f"connection closed: {reason}"))
        self._pending.clear()
        self._after_io()
        if not self.authenticated.done():
            self.authenticated.set_exception(DialError(reason))
            self.authenticated.exception()  # retrieved: dial() reports it, if anyone dialed
        self.endpoint._on_closing(self)

    def _on_terminated(self, reason: str) -> None:
        self._begin_close(reason)
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.endpoint._on_closed(self)

    def rtt(self) -> float | None:
        recovery = getattr(self._quic, "_loss", None)
        if recovery is None or not getattr(recovery, "_rtt_initialized", False):
            return None
        return float(recovery._rtt_smoothed)


class _UdpSocket(asyncio.DatagramProtocol):
    """One UDP socket; routes datagrams to connections by destination connection id."""

    def __init__(self, endpoint: MeshEndpoint, *, accept: bool) -> None:
        self._endpoint = endpoint
        self._accept = accept
        self.transport: asyncio.DatagramTransport | None = None
        self._by_cid: dict[bytes, _PeerProtocol] = {}
        self.protocols: set[_PeerProtocol] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...): the connection's own timers decide.
        log.debug("udp error: %s", exc)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            return
        proto = self._by_cid.get(header.destination_cid)
        if proto is None:
            if not (
                self._accept
                and header.packet_type == QuicPacketType.INITIAL
                and len(data) >= SMALLEST_MAX_DATAGRAM_SIZE
                and header.version in self._endpoint._server_config.supported_versions
            ):
                return
            proto = self._endpoint._accept_connection(self, header.destination_cid, addr)
            if proto is None:
                return
        proto.datagram_received(data, addr)

    def add(self, proto: _PeerProtocol, cids: list[bytes]) -> None:
        self.protocols.add(proto)
        for cid in cids:
            self._by_cid[cid] = proto

        def issued(cid: bytes) -> None:
            self._by_cid[cid] = proto

        def retired(cid: bytes) -> None:
            if self._by_cid.get(cid) is proto:
                del self._by_cid[cid]

        proto._connection_id_issued_handler = issued
        proto._connection_id_retired_handler = retired
        proto.connection_made(cast(asyncio.BaseTransport, self.transport))

    def remove(self, proto: _PeerProtocol) -> None:
        self.protocols.discard(proto)
        for cid in [c for c, p in self._by_cid.items() if p is proto]:
            del self._by_cid[cid]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


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
        on_peer_connected: Callable[[PeerConnection], None],
        on_peer_lost: Callable[[str, str], None],
        on_control_frame: Callable[[str, Frame], None],
        on_stream: StreamHandler,
    ) -> None:
        if not SMALLEST_MAX_DATAGRAM_SIZE <= max_datagram_size <= 65527:
            raise ValueError(
                f"max_datagram_size must be in {SMALLEST_MAX_DATAGRAM_SIZE}-65527"
            )
        if idle_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.identity = identity
        self.mesh = mesh
        self._host, self._port = host, port
        self.handshake_timeout = handshake_timeout
        self._on_peer_connected = on_peer_connected
        self._on_peer_lost = on_peer_lost
        self._on_control_frame = on_control_frame
        self._on_stream = on_stream
        self._client_config = self._config(True, max_datagram_size, idle_timeout)
        self._server_config = self._config(False, max_datagram_size, idle_timeout)
        self._sock: _UdpSocket | None = None
        self._family = socket.AF_INET
        self._extra_socks: set[_UdpSocket] = set()
        self._peers: dict[str, _PeerProtocol] = {}
        self._protocols: set[_PeerProtocol] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._callbacks: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._callbacks_scheduled = False
        self._closing = False
        self.port = 0

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def _config(self, is_client: bool, max_datagram_size: int, idle: float) -> QuicConfiguration:
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=idle,
            max_datagram_size=max_datagram_size,
            max_data=MAX_DATA,
            max_stream_data=MAX_STREAM_DATA,
            connection_id_length=CID_LENGTH,
        )
        if is_client:
            # Peers have self-signed certificates. The handshake proves who a peer
            # is, and checks the certificate carries that key before we prove anything.
            cfg.verify_mode = ssl.CERT_NONE
            cfg.server_name = "mesh-inference"
        else:
            cfg.certificate = self.identity.certificate
            cfg.private_key = self.identity.private_key
        return cfg

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        transport, sock = await loop.create_datagram_endpoint(
            lambda: _UdpSocket(self, accept=True), local_addr=(self._host, self._port)
        )
        self._sock = sock
        self._family = transport.get_extra_info("socket").family
        self.port = int(transport.get_extra_info("sockname")[1])
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

    def _deliver_control(self, proto: _PeerProtocol, frame: Frame) -> None:
        assert proto.peer is not None
        if self._peers.get(proto.peer.peer_id) is proto and not self._closing:
            self._deliver(self._on_control_frame, proto.peer.peer_id, frame)

    def _spawn_handler(
        self, peer_id: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run_handler(peer_id, first, reader, writer)
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

    # -- connection life cycle (called by _PeerProtocol / _UdpSocket)
    def _accept_connection(
        self, sock: _UdpSocket, dcid: bytes, addr: NetworkAddress
    ) -> _PeerProtocol | None:
        handshaking = sum(1 for p in self._protocols if not p.authed)
        if self._closing or handshaking >= MAX_HANDSHAKING:
            return None
        quic = QuicConnection(
            configuration=self._server_config, original_destination_connection_id=dcid
        )
        proto = _PeerProtocol(
            quic, self, dialer=False, remote_address=format_addr(addr[0], addr[1]), sock=sock
        )
        sock.add(proto, [dcid, quic.host_cid])
        self._protocols.add(proto)
        return proto

    def _on_authenticated(self, proto: _PeerProtocol) -> None:
        assert proto.peer is not None
        peer_id = proto.peer.peer_id
        existing = self._peers.get(peer_id)
        if existing is not None:
            now = asyncio.get_running_loop().time()
            # Both sides dialed: both keep the one dialed by the smaller id. An old
            # connection that went silent lost its peer (restarted): take the new one.
            keep_new = now - existing.last_rx > STALE_AFTER or (
                (self.identity.node_id < peer_id) == proto.dialer
            )
            loser = existing if keep_new else proto
            loser.superseded = True
            if keep_new:
                self._peers[peer_id] = proto
            loser.fail(ERR_DUPLICATE, "duplicate connection", level=logging.INFO)
            return
        self._peers[peer_id] = proto
        log.info(
            "authenticated peer %s (%s)", proto.describe(), "dialed" if proto.dialer else "accepted"
        )
        self._deliver(self._on_peer_connected, proto.peer)

    def _on_closing(self, proto: _PeerProtocol) -> None:
        if proto.peer is None or proto.superseded:
            return
        peer_id = proto.peer.peer_id
        if self._peers.get(peer_id) is proto:
            del self._peers[peer_id]
            if not self._closing:
                self._deliver(self._on_peer_lost, peer_id, proto.close_reason)

    def _on_closed(self, proto: _PeerProtocol) -> None:
        self._protocols.discard(proto)
        proto.sock.remove(proto)
        if proto.sock in self._extra_socks and not proto.sock.protocols:
            self._extra_socks.discard(proto.sock)
            proto.sock.close()

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
                _, sock = await loop.create_datagram_endpoint(
                    lambda: _UdpSocket(self, accept=False), local_addr=(any_host, 0), family=family
                )
            except OSError as exc:
                raise DialError(f"dial {addr}: {exc}") from None
            self._extra_socks.add(sock)
        quic = QuicConnection(configuration=self._client_config)
        proto = _PeerProtocol(quic, self, dialer=True, remote_address=addr, sock=sock)
        sock.add(proto, [quic.host_cid])
        self._protocols.add(proto)
        proto.connect(sockaddr)
        try:
            peer = await asyncio.wait_for(
                asyncio.shield(proto.authenticated), max(0.0, deadline - loop.time())
            )
        except TimeoutError:
            proto.fail(ERR_AUTH, "dial timed out", level=logging.DEBUG)
            raise DialError(f"dial {addr}: no authenticated answer within {timeout} s") from None
        except DialError as exc:
            raise DialError(f"dial {addr}: {exc}") from None
        except asyncio.CancelledError:
            proto.fail(ERR_NONE, "dial cancelled", level=logging.DEBUG)
            raise
        return peer.peer_id

    def _peer(self, peer_id: str) -> _PeerProtocol:
        proto = self._peers.get(peer_id)
        if proto is None or proto.closing:
            raise UnknownPeer(peer_id)
        return proto

    def send_control(self, peer_id: str, type: MessageType, payload: bytes) -> None:
        """Send one DCF frame on the peer's control stream, now. Raises UnknownPeer."""
        self._peer(peer_id).send_control(type, payload)

    async def open_stream_raw(self, peer_id: str) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        """A new stream to ``peer_id``; the caller writes its first DCF frame (seq 0)."""
        return self._peer(peer_id).open_stream()

    async def open_stream(
        self, peer_id: str, first_type: MessageType, first_payload: bytes
    ) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        """A new stream whose first frame (OpenTunnel or Task) is already sent."""
        if first_type not in _STREAM_TYPES:
            raise ValueError(f"a stream cannot start with {first_type.name}")
        reader, writer = await self.open_stream_raw(peer_id)
        writer.write(
            _encode_frame(Frame(first_type, 0, _now_us(), first_payload), MAX_FIRST_FRAME)
        )
        return reader, writer

    def disconnect(self, peer_id: str, reason: str) -> None:
        """Close the connection to ``peer_id``; ``on_peer_lost`` follows with ``reason``."""
        proto = self._peers.get(peer_id)
        if proto is not None:
            proto.fail(ERR_NONE, reason, level=logging.INFO)

    def peers(self) -> list[str]:
        return [pid for pid, p in self._peers.items() if not p.closing]

    def peer_connection(self, peer_id: str) -> PeerConnection | None:
        proto = self._peers.get(peer_id)
        return proto.peer if proto is not None and not proto.closing else None

    def rtt(self, peer_id: str) -> float | None:
        proto = self._peers.get(peer_id)
        return proto.rtt() if proto is not None else None

    async def close(self) -> None:
        """Close every connection (peers see "shutting down") and the socket(s)."""
        if self._closing:
            return
        self._closing = True
        for proto in list(self._protocols):
            proto.fail(ERR_NONE, "shutting down", level=logging.DEBUG)
        # CONNECTION_CLOSE datagrams went out synchronously in fail(); stop the timers.
        for proto in list(self._protocols):
            proto._on_terminated("shutting down")
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
