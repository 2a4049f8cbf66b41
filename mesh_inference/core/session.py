"""One connection to a peer, sans-I/O: QUIC, the mesh handshake, streams, stream credit.

Public API::

    cfg = quic_configuration(identity, is_client=True, max_datagram_size=1452, idle_timeout=15.0)
    quic = QuicConnection(configuration=cfg)     # a server one: see aioquic's asyncio/server.py
    s = PeerSession(quic, identity, mesh, now=t, handshake_timeout=5.0,
                    rtt_interval=2.0, wall_offset=0.0)
    s.connect(addr, now)                   # a dialer's (client) QuicConnection: start TLS
    s.receive_datagram(data, addr, now); s.handle_timer(now)        # inputs
    s.datagrams_to_send(now) -> [(data, addr)]; s.get_timer()       # outputs
    s.next_event() -> SessionEvent | None                           # what happened, in order
    sid = s.open_stream(first_type, first_payload)   # OpenTunnel/Task/FetchModel, sent at once
    sid = s.open_stream_raw()                        # the caller sends the first frame
    s.send_data(sid, data); s.end_stream(sid)        # ConnectionResetError if unwritable
    s.close_stream(sid)                              # reset unless FIN was asked; stop reading
    s.consumed(sid, n) -> bool                       # the application took n bytes
    s.send_control(mtype, payload)                   # after authentication
    s.blocked_bytes(sid); s.has_stream(sid)
    s.refuse_streams()     # a superseded duplicate: new peer streams are reset, never reported
    s.request_rtt(); s.rtt                           # smoothed RTT (s) or None
    s.close(reason, code)
    s.is_dialer, s.authenticated, s.peer_id, s.peer_pubkey_der, s.channel_binding,
    s.closed, s.close_reason, s.terminated

Events are frozen dataclasses (see ``SessionEvent``). ``SessionClosed`` comes
once: at once for a local close, when aioquic reports it for a peer's
close or the idle timeout; ``SessionTerminated`` when the QUIC state is
gone (after the closing/draining period) and the edge may drop the session.

Handshake (handshake.py, DESIGN.md "Handshake") on the control stream,
stream 0, once TLS completes. The proofs are bound to this TLS session
with ``channel_binding``: ``tls.key_schedule.derive_secret(CHANNEL_BINDING_LABEL)``
taken at ``HandshakeCompleted``, when both ends' key schedules hash the
TLS transcript through the client Finished (aioquic's server anticipates
it), so it is equal on both ends and different for every TLS session.
Before authentication: control frames of at most ``MAX_HANDSHAKE_PAYLOAD``,
a deadline (``handshake_timeout``), and any data stream closes the
connection -- except on the dialer between the acceptor's verified Proof
and its Welcome, where streams are held (bounded) since different streams
are not ordered.

Every other stream starts with one DCF frame (OpenTunnel, Task or FetchModel) that the
session decodes and reports with ``StreamOpened``; the bytes after it come
as ``StreamDataReceived``. Data on a stream the session already forgot is
dropped: it is late, not a new stream.

Credit: aioquic grows its receive windows as data arrives, whether or not
the application reads it. So each stream direction also has application
credit: a sender may have at most ``STREAM_WINDOW`` bytes that the
receiving application has not consumed. The receiver reports consumption
(``consumed()``) to the sender in Credit frames on the control stream
(``{"s": stream id, "n": bytes}``, sent once ``GRANT_THRESHOLD`` bytes are
due); the sender queues what exceeds its credit (``blocked_bytes``) and
reports ``StreamWritable`` when the queue is empty again. Exceeding the
credit, or granting credit for bytes never sent, is a protocol error.

RTT: a PING every ``rtt_interval`` (and on ``request_rtt()``); the time to
its acknowledgement (which includes the peer's ack delay, 1 ms in aioquic)
is smoothed like RFC 9002's smoothed_rtt.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mesh_inference.core.dcf import (
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameEncoder,
    MessageType,
    ProtocolError,
    encode_frame,
)
from mesh_inference.core.handshake import MAX_HANDSHAKE_PAYLOAD, AuthFailed, Handshake
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.core.messages import Credit, decode_payload, encode_payload
from mesh_inference.core.quicstack import (
    STACK_ERRORS,
    NetworkAddress,
    QuicConfiguration,
    QuicConnection,
    channel_binding,
    configure_client,
    configure_server_identity,
)
from mesh_inference.core.quicstack import events as qe

log = logging.getLogger(__name__)

ALPN = "mesh-inference/1"
CONTROL_STREAM = 0
CID_LENGTH = 8  # the edge routes datagrams by destination connection id of this length
# Initial QUIC flow-control windows (aioquic grows them as data arrives): far
# above the application credit, so QUIC flow control never binds first.
MAX_DATA = 64 << 20
MAX_STREAM_DATA = 16 << 20
CHANNEL_BINDING_LABEL = b"mesh-inference channel binding"
# 4 MiB unconsumed per stream direction: 1 GbE at 1 ms RTT needs ~125 KB in
# flight, so a stream is never window-bound on a LAN, while a peer can make
# us hold at most this much per stream it opened.
STREAM_WINDOW = 4 << 20
GRANT_THRESHOLD = STREAM_WINDOW // 8  # fewer, bigger Credit frames; < window: no deadlock
MAX_FIRST_FRAME = 64 << 10
MAX_STREAMS = 256  # concurrent streams per connection
# Held streams on the dialer between the acceptor's Proof and its Welcome.
MAX_HELD_BYTES = 1 << 20
# Peer stream ids finished out of order (a hostile peer leaving gaps).
MAX_DONE_OUT_OF_ORDER = 4096
HANDSHAKE_TIMEOUT = 5.0
RTT_INTERVAL = 2.0
_HANDSHAKE_TYPES = frozenset({MessageType.HELLO, MessageType.PROOF, MessageType.WELCOME})
STREAM_TYPES = frozenset(
    {MessageType.OPEN_TUNNEL, MessageType.TASK, MessageType.FETCH_MODEL}
)

# Application error codes (CONNECTION_CLOSE, RESET_STREAM, STOP_SENDING).
ERR_NONE = 0x0
ERR_PROTOCOL = 0x1
ERR_AUTH = 0x2
ERR_DUPLICATE = 0x3
ERR_INTERNAL = 0x4
ERR_REFUSED = 0x5


def quic_configuration(
    identity: NodeIdentity, *, is_client: bool, max_datagram_size: int, idle_timeout: float
) -> QuicConfiguration:
    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        max_data=MAX_DATA,
        max_stream_data=MAX_STREAM_DATA,
        connection_id_length=CID_LENGTH,
    )
    if is_client:
        # Peers have self-signed certificates, and none needs checking: the
        # handshake proves the node key, and the channel binding this session.
        cfg.verify_mode = ssl.CERT_NONE
        cfg.server_name = "mesh-inference"
        configure_client(cfg)
    else:
        configure_server_identity(cfg, identity)
    return cfg


# ---------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class ConnectionIdIssued:
    connection_id: bytes  # route datagrams with this destination id to this session


@dataclass(frozen=True, slots=True)
class ConnectionIdRetired:
    connection_id: bytes


@dataclass(frozen=True, slots=True)
class PeerAuthenticated:
    peer_id: str
    pubkey_der: bytes


@dataclass(frozen=True, slots=True)
class ControlFrameReceived:
    frame: Frame  # never a handshake or Credit frame


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int
    first_frame: Frame  # OpenTunnel, Task or FetchModel


@dataclass(frozen=True, slots=True)
class StreamDataReceived:
    stream_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class StreamResetByPeer:
    stream_id: int  # the peer abandoned its sending side: no more data will come


@dataclass(frozen=True, slots=True)
class StreamStoppedByPeer:
    stream_id: int  # the peer stopped reading: our sending side is reset


@dataclass(frozen=True, slots=True)
class StreamWritable:
    stream_id: int  # credit arrived: nothing is queued any more


@dataclass(frozen=True, slots=True)
class StreamClosed:
    stream_id: int  # finished both ways; the session forgot it


@dataclass(frozen=True, slots=True)
class RttMeasured:
    sample: float
    smoothed: float


@dataclass(frozen=True, slots=True)
class SessionClosed:
    reason: str
    code: int
    by_peer: bool  # the peer closed, or the idle timeout expired


@dataclass(frozen=True, slots=True)
class SessionTerminated:
    pass


SessionEvent = (
    ConnectionIdIssued
    | ConnectionIdRetired
    | PeerAuthenticated
    | ControlFrameReceived
    | StreamOpened
    | StreamDataReceived
    | StreamResetByPeer
    | StreamStoppedByPeer
    | StreamWritable
    | StreamClosed
    | RttMeasured
    | SessionClosed
    | SessionTerminated
)


class _Stream:
    __slots__ = (
        "blocked",
        "fin_wanted",
        "first",
        "received",
        "recv_done",
        "recv_limit",
        "recv_stopped",
        "send_done",
        "send_limit",
        "sent",
        "unreported",
    )

    def __init__(self, *, peer_opened: bool) -> None:
        # Sending: at most send_limit bytes ever handed to QUIC; the rest waits in blocked.
        self.send_limit = STREAM_WINDOW
        self.sent = 0
        self.blocked = bytearray()
        self.fin_wanted = False
        self.send_done = False  # FIN handed to QUIC, or reset
        # Receiving: the peer may send up to recv_limit bytes.
        self.recv_limit = STREAM_WINDOW
        self.received = 0
        self.unreported = 0  # consumed, not yet granted back
        self.recv_done = False  # FIN or reset received
        self.recv_stopped = False  # we stopped reading (STOP_SENDING)
        self.first: bytearray | None = bytearray() if peer_opened else None


class PeerSession:
    """One QUIC connection to a (would-be) peer; see the module docstring."""

    def __init__(
        self,
        quic: QuicConnection,
        identity: NodeIdentity,
        mesh: MeshCredentials,
        *,
        now: float,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        rtt_interval: float = RTT_INTERVAL,
        wall_offset: float = 0.0,
    ) -> None:
        if handshake_timeout <= 0 or rtt_interval <= 0:
            raise ValueError("timeouts must be positive")
        self._quic = quic
        self._identity = identity
        self._mesh = mesh
        self.is_dialer = bool(quic.configuration.is_client)
        self._now = now
        self._deadline = now + handshake_timeout
        self._rtt_interval = rtt_interval
        self._wall_offset = wall_offset  # DCF timestamps are wall clock µs: now + offset
        self._events: deque[SessionEvent] = deque()
        self._hs: Handshake | None = None
        self.channel_binding: bytes | None = None
        self.authenticated = False
        self.peer_id: str | None = None
        self.peer_pubkey_der: bytes | None = None
        self.closed = False
        self.close_reason = ""
        self.terminated = False
        self._closing_out: list[tuple[bytes, NetworkAddress]] = []
        self._refusing = False
        self._started = not self.is_dialer  # a server connection starts with its first datagram
        self._ctl_enc = FrameEncoder()
        self._ctl_dec = FrameDecoder(max_payload=MAX_HANDSHAKE_PAYLOAD)
        self._streams: dict[int, _Stream] = {}
        self._held: list[SessionEvent] = []
        self._held_bytes = 0
        # Peer-opened stream ids below _peer_floor are finished, and those in _peer_done.
        self._peer_floor = 1 if self.is_dialer else 4
        self._peer_done: set[int] = set()
        self._ping_uid = 0
        self._ping_sent: tuple[int, float] | None = None
        self._ping_due: float | None = None
        self.rtt: float | None = None

    # ------------------------------------------------------------------ I/O
    @property
    def claimed_peer_id(self) -> str | None:
        """The node id the peer's Hello claimed (unproven until ``authenticated``)."""
        if self.peer_id is not None:
            return self.peer_id
        return self._hs.peer_id if self._hs is not None else None

    def connect(self, addr: NetworkAddress, now: float) -> None:
        self._now = now
        self._quic.connect(addr, now=now)
        self._started = True

    def receive_datagram(self, data: bytes, addr: NetworkAddress, now: float) -> None:
        self._now = now
        if self.terminated:
            return
        try:
            self._quic.receive_datagram(data, addr, now=now)
        except Exception as exc:
            self._stack_failed(exc)
            return
        self._started = True
        self._process()

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self.terminated:
            return
        if not self.authenticated and not self.closed and now >= self._deadline:
            self.close("handshake timed out", ERR_AUTH)
        quic_at = self._quic.get_timer() if self._started else None
        if quic_at is not None and now >= quic_at:
            try:
                self._quic.handle_timer(now=now)
            except Exception as exc:
                self._stack_failed(exc)
                return
        self._process()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        self._now = now
        # Not skipped once terminated: qh3 reports termination as soon as the
        # application closes, with the CONNECTION_CLOSE still to be sent.
        if not self._started:
            return []
        if (
            self.authenticated
            and not self.closed
            and self._ping_sent is None
            and self._ping_due is not None
            and now >= self._ping_due
        ):
            self._ping_uid += 1
            try:
                self._quic.send_ping(self._ping_uid)
            except STACK_ERRORS as exc:
                self._stack_failed(exc)
                return []
            self._ping_sent = (self._ping_uid, now)  # it goes out in this very call
        try:
            out = self._quic.datagrams_to_send(now=now)
        except Exception as exc:
            self._stack_failed(exc)
            out = []
        if self._closing_out:
            out, self._closing_out = [*self._closing_out, *out], []
        self._process()  # sending can issue connection ids
        return out

    def get_timer(self) -> float | None:
        if not self._started or self.terminated:
            return None
        timers = [self._quic.get_timer()]
        if not self.closed:
            if not self.authenticated:
                timers.append(self._deadline)
            elif self._ping_sent is None:
                timers.append(self._ping_due)
        return min((t for t in timers if t is not None), default=None)

    def next_event(self) -> SessionEvent | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------ application calls
    def send_control(self, mtype: MessageType, payload: bytes) -> None:
        if mtype in _HANDSHAKE_TYPES:
            raise ValueError(f"{mtype.name} belongs to the handshake")
        if mtype == MessageType.CREDIT:
            raise ValueError("CREDIT frames belong to the session")
        self._require_open()
        self._send_frame(mtype, payload)

    def open_stream_raw(self) -> int:
        self._require_open()
        if len(self._streams) >= MAX_STREAMS:
            raise ConnectionResetError(f"more than {MAX_STREAMS} streams to this peer")
        sid = int(self._quic.get_next_available_stream_id())
        # Create it now, so the next call gets another id even before any write.
        self._guarded(self._quic.send_stream_data, sid, b"")
        self._streams[sid] = _Stream(peer_opened=False)
        return sid

    def open_stream(self, first_type: MessageType, first_payload: bytes) -> int:
        if first_type not in STREAM_TYPES:
            raise ValueError(f"a stream cannot start with {first_type.name}")
        frame = encode_frame(Frame(first_type, 0, self._timestamp_us(), first_payload),
                             MAX_FIRST_FRAME)
        sid = self.open_stream_raw()
        self.send_data(sid, frame)
        return sid

    def send_data(self, sid: int, data: bytes) -> None:
        st = self._writable(sid)
        if not data:
            return
        if st.blocked:
            st.blocked += data
            return
        room = st.send_limit - st.sent
        if room >= len(data):
            self._guarded(self._quic.send_stream_data, sid, data)
            st.sent += len(data)
            return
        if room > 0:
            self._guarded(self._quic.send_stream_data, sid, data[:room])
            st.sent += room
        st.blocked += data[room:]

    def end_stream(self, sid: int) -> None:
        st = self._writable(sid)
        st.fin_wanted = True
        if not st.blocked:
            self._send_fin(sid, st)

    def close_stream(self, sid: int) -> None:
        """The application is done: reset unless FIN was asked for; stop the peer sending."""
        st = self._streams.get(sid)
        if st is None or self.closed:
            return
        if not st.send_done and not st.fin_wanted:
            st.send_done = True
            st.blocked.clear()
            self._guarded(self._quic.reset_stream, sid, ERR_NONE)
        if not st.recv_done and not st.recv_stopped:
            st.recv_stopped = True
            self._stop(sid)
        self._maybe_forget(sid, st)

    def consumed(self, sid: int, n: int) -> bool:
        """Returns whether a Credit frame is now waiting to be sent."""
        st = self._streams.get(sid)
        if st is None or n <= 0 or st.recv_done or st.recv_stopped or self.closed:
            return False
        st.unreported += n
        if st.unreported < GRANT_THRESHOLD:
            return False
        grant, st.unreported = st.unreported, 0
        st.recv_limit += grant
        self._send_frame(MessageType.CREDIT, encode_payload(Credit(sid, grant)))
        return True

    def blocked_bytes(self, sid: int) -> int:
        st = self._streams.get(sid)
        return len(st.blocked) if st is not None else 0

    def has_stream(self, sid: int) -> bool:
        return sid in self._streams

    def refuse_streams(self) -> None:
        self._refusing = True

    def request_rtt(self) -> None:
        if self._ping_sent is None:
            self._ping_due = self._now

    def close(self, reason: str, code: int = ERR_NONE) -> None:
        if self.closed:
            return
        self._set_closed(reason, code, by_peer=False)
        try:
            self._quic.close(error_code=code, reason_phrase=reason[:200])
        except STACK_ERRORS as exc:  # already closed underneath: nothing to send
            self._stack_failed(exc)
            return
        # Built now: qh3 may report the connection terminated before the next
        # datagrams_to_send, and then has nothing left to send.
        try:
            self._closing_out.extend(self._quic.datagrams_to_send(now=self._now))
        except Exception as exc:
            self._stack_failed(exc)

    # ------------------------------------------------------------------ internals
    def _require_open(self) -> None:
        if self.closed or not self.authenticated:
            why = self.close_reason or "not authenticated"
            raise ConnectionResetError(f"connection is not open: {why}")

    def _writable(self, sid: int) -> _Stream:
        if self.closed:
            raise ConnectionResetError(f"connection closed: {self.close_reason}")
        st = self._streams.get(sid)
        if st is None or st.send_done or st.fin_wanted:
            raise ConnectionResetError(f"stream {sid} is not writable")
        return st

    def _timestamp_us(self) -> int:
        return max(0, int((self._now + self._wall_offset) * 1_000_000))

    def _send_frame(self, mtype: MessageType, payload: bytes) -> None:
        data = self._ctl_enc.encode(mtype, payload, self._timestamp_us())
        self._guarded(self._quic.send_stream_data, CONTROL_STREAM, data)

    def _send_fin(self, sid: int, st: _Stream) -> None:
        st.send_done = True
        self._guarded(self._quic.send_stream_data, sid, b"", end_stream=True)
        self._maybe_forget(sid, st)

    def _stop(self, sid: int) -> None:
        # ValueError: aioquic already discarded it, nothing left to stop.
        with contextlib.suppress(ValueError):
            self._quic.stop_stream(sid, ERR_NONE)

    def _emit(self, event: SessionEvent) -> None:
        self._events.append(event)

    def _set_closed(self, reason: str, code: int, *, by_peer: bool) -> None:
        self.closed = True
        self.close_reason = reason
        self._streams.clear()
        self._held.clear()
        self._emit(SessionClosed(reason, code, by_peer))

    def _guarded(self, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        """An application call into the stack; ConnectionResetError if the stack is done."""
        try:
            return fn(*args, **kwargs)
        except STACK_ERRORS as exc:
            self._stack_failed(exc)
            raise ConnectionResetError(f"connection is closed: {exc}") from None

    def _stack_failed(self, exc: Exception) -> None:
        # The QUIC stack itself raised (qh3 can, e.g. "packet builder capacity exhausted"
        # while closing): this connection is over, nothing else is.
        # Before authentication it is a stranger's junk (aioquic raises on some undecryptable
        # first packets): not worth a warning each.
        log.log(logging.WARNING if self.authenticated else logging.DEBUG,
                "QUIC stack error on a peer session: %r", exc)
        if not self.closed:
            self._set_closed(f"QUIC stack error: {exc}", ERR_INTERNAL, by_peer=False)
        self.terminated = True
        self._emit(SessionTerminated())

    def _process(self) -> None:
        while (event := self._quic.next_event()) is not None:
            if isinstance(event, qe.ConnectionIdIssued):
                self._emit(ConnectionIdIssued(event.connection_id))
            elif isinstance(event, qe.ConnectionIdRetired):
                self._emit(ConnectionIdRetired(event.connection_id))
            elif isinstance(event, qe.ConnectionTerminated):
                if not self.closed:
                    reason = event.reason_phrase or f"closed (error {event.error_code})"
                    self._set_closed(reason, event.error_code, by_peer=True)
                self.terminated = True
                self._emit(SessionTerminated())
            elif not self.closed:
                try:
                    self._on_quic_event(event)
                except AuthFailed as exc:
                    self.close(exc.reason, ERR_AUTH)
                except ProtocolError as exc:
                    self.close(f"protocol error: {exc}", ERR_PROTOCOL)
                except ConnectionResetError:
                    pass  # the stack closed underneath (_guarded ended this session)
                except Exception as exc:  # a bug must cost this connection, nothing more
                    log.exception("internal error on a peer session")
                    self.close(f"internal error: {exc!r}", ERR_INTERNAL)

    def _on_quic_event(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.StreamDataReceived):
            if event.stream_id == CONTROL_STREAM:
                self._on_control_data(event.data, event.end_stream)
            else:
                self._on_stream_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, qe.StreamReset):
            self._on_stream_reset(event.stream_id)
        elif isinstance(event, qe.StopSendingReceived):
            self._on_stop_sending(event.stream_id)
        elif isinstance(event, qe.PingAcknowledged):
            self._on_ping_ack(event.uid)
        elif isinstance(event, qe.HandshakeCompleted):
            self._on_tls_complete()

    # -- handshake and control stream
    def _on_tls_complete(self) -> None:
        binding = channel_binding(self._quic, CHANNEL_BINDING_LABEL)
        if binding is None:
            raise AuthFailed("auth failed: TLS finished without a key schedule")
        self.channel_binding = binding
        if self.is_dialer and self._quic.get_next_available_stream_id() != CONTROL_STREAM:
            raise ProtocolError("the control stream must be the dialer's first stream")
        self._hs = Handshake(
            self._identity, self._mesh, is_dialer=self.is_dialer,
            channel_binding=self.channel_binding,
        )
        self._flush_handshake()
        self._read_control()  # an acceptor may already hold the dialer's Hello

    def _flush_handshake(self) -> None:
        assert self._hs is not None
        for mtype, payload in self._hs.pop_frames():
            self._send_frame(mtype, payload)

    def _on_control_data(self, data: bytes, end: bool) -> None:
        if end:
            raise ProtocolError("the peer closed the control stream")
        self._ctl_dec.push(data)
        if self._hs is None:
            # 1-RTT data can overtake the TLS Finished: hold one handshake frame at most.
            if self._ctl_dec.buffered > HEADER_SIZE + MAX_HANDSHAKE_PAYLOAD:
                raise ProtocolError("too much control data before the TLS handshake completed")
            return
        self._read_control()

    def _read_control(self) -> None:
        while not self.closed and (frame := self._ctl_dec.next_frame()) is not None:
            if not self.authenticated:
                assert self._hs is not None
                self._hs.handle_frame(frame)
                self._flush_handshake()
                if self._hs.complete:
                    self._on_authenticated()
            elif frame.type in _HANDSHAKE_TYPES:
                raise ProtocolError(f"{frame.type.name} after the handshake")
            elif frame.type == MessageType.CREDIT:
                msg = decode_payload(frame.type, frame.payload)
                assert isinstance(msg, Credit)
                self._on_credit(msg)
            else:
                self._emit(ControlFrameReceived(frame))

    def _on_authenticated(self) -> None:
        hs = self._hs
        assert hs is not None and hs.peer_id is not None and hs.peer_pubkey_der is not None
        self.authenticated = True
        self.peer_id, self.peer_pubkey_der = hs.peer_id, hs.peer_pubkey_der
        # Only now may control frames be as big as any other DCF frame.
        self._ctl_dec.max_payload = DEFAULT_MAX_PAYLOAD
        self._emit(PeerAuthenticated(hs.peer_id, hs.peer_pubkey_der))
        held, self._held, self._held_bytes = self._held, [], 0
        self._events.extend(held)
        self._ping_due = self._now

    # -- credit
    def _on_credit(self, msg: Credit) -> None:
        st = self._streams.get(msg.stream_id)
        if st is None or (st.send_done and not st.blocked):
            return  # late: the stream is finished or gone
        if st.send_limit - STREAM_WINDOW + msg.n > st.sent:
            raise ProtocolError(f"credit for bytes never sent on stream {msg.stream_id}")
        st.send_limit += msg.n
        if not st.blocked:
            return
        room = st.send_limit - st.sent
        chunk = bytes(st.blocked[:room])
        del st.blocked[:room]
        self._guarded(self._quic.send_stream_data, msg.stream_id, chunk)
        st.sent += len(chunk)
        if not st.blocked:
            self._emit(StreamWritable(msg.stream_id))
            if st.fin_wanted and not st.send_done:
                self._send_fin(msg.stream_id, st)

    # -- data streams
    def _is_local(self, sid: int) -> bool:
        return (sid & 1) == (0 if self.is_dialer else 1)

    def _peer_stream_done(self, sid: int) -> bool:
        return sid < self._peer_floor or sid in self._peer_done

    def _mark_peer_done(self, sid: int) -> None:
        self._peer_done.add(sid)
        while self._peer_floor in self._peer_done:
            self._peer_done.discard(self._peer_floor)
            self._peer_floor += 4
        if len(self._peer_done) > MAX_DONE_OUT_OF_ORDER:
            raise ProtocolError("too many streams left open below finished ones")

    def _new_peer_stream(self, sid: int) -> _Stream | None:
        """A stream the peer opens now; None if it is refused."""
        if sid & 2:
            raise ProtocolError("unidirectional streams are not used")
        if self._hs is None or not self._hs.peer_proved:
            raise ProtocolError("data stream opened before authentication")
        if self._refusing:
            # A superseded duplicate connection: its streams must not reach the node.
            self._guarded(self._quic.reset_stream, sid, ERR_REFUSED)
            self._stop(sid)
            self._mark_peer_done(sid)
            return None
        if len(self._streams) >= MAX_STREAMS:
            raise ProtocolError(f"more than {MAX_STREAMS} concurrent streams")
        st = self._streams[sid] = _Stream(peer_opened=True)
        return st

    def _emit_stream(self, event: SessionEvent, size: int) -> None:
        if self.authenticated:
            self._emit(event)
            return
        # The dialer verified the acceptor's Proof; its Welcome is on the way.
        self._held_bytes += size
        if self._held_bytes > MAX_HELD_BYTES:
            raise ProtocolError("too much stream data before the handshake completed")
        self._held.append(event)

    def _on_stream_data(self, sid: int, data: bytes, end: bool) -> None:
        st = self._streams.get(sid)
        if st is None:
            if self._is_local(sid) or self._peer_stream_done(sid):
                return  # late data on a stream we finished: nowhere to go, no harm done
            st = self._new_peer_stream(sid)
            if st is None:
                return
        if st.recv_done or st.recv_stopped:
            return  # in flight when we stopped reading
        st.received += len(data)
        if st.received > st.recv_limit:
            raise ProtocolError(f"stream {sid}: the peer sent beyond its credit")
        if end:
            st.recv_done = True
        if st.first is not None:
            self._on_first_frame_data(sid, st, data, end)
        elif data or end:
            self._emit_stream(StreamDataReceived(sid, data, end), len(data))
        if end:
            self._maybe_forget(sid, st)

    def _on_first_frame_data(self, sid: int, st: _Stream, data: bytes, end: bool) -> None:
        assert st.first is not None
        buf = st.first
        buf += data
        size = HEADER_SIZE
        if len(buf) >= HEADER_SIZE:
            # Check the length before waiting for the payload: never buffer a hostile size.
            length = int(HEADER.unpack_from(buf)[3])
            if length > MAX_FIRST_FRAME:
                raise ProtocolError(f"first frame of stream {sid} is {length} B")
            size += length
        if len(buf) < size:
            if end:
                raise ProtocolError(f"stream {sid} ended inside its first frame")
            return
        first = FrameDecoder(max_payload=MAX_FIRST_FRAME).feed(bytes(buf[:size]))[0]
        if first.type not in STREAM_TYPES:
            raise ProtocolError(f"stream {sid} opened with {first.type.name}")
        rest = bytes(buf[size:])
        st.first = None
        self._emit_stream(StreamOpened(sid, first), size)
        if rest or end:
            self._emit_stream(StreamDataReceived(sid, rest, end), len(rest))
        self.consumed(sid, size)  # the session itself consumed the first frame

    def _on_stream_reset(self, sid: int) -> None:
        if sid == CONTROL_STREAM:
            raise ProtocolError("the peer closed the control stream")
        st = self._streams.get(sid)
        if st is None:
            if not self._is_local(sid) and not self._peer_stream_done(sid):
                if self._hs is None or not self._hs.peer_proved:
                    raise ProtocolError("data stream opened before authentication")
                self._mark_peer_done(sid)  # opened and abandoned before any data
            return
        if st.recv_done:
            return
        st.recv_done = True
        if st.first is not None:
            # Never reported: forget it quietly, and end our side of it too.
            st.send_done = True
            self._guarded(self._quic.reset_stream, sid, ERR_NONE)
        elif not st.recv_stopped:
            self._emit_stream(StreamResetByPeer(sid), 0)
        self._maybe_forget(sid, st)

    def _on_stop_sending(self, sid: int) -> None:
        if sid == CONTROL_STREAM:
            raise ProtocolError("the peer stopped reading the control stream")
        st = self._streams.get(sid)
        if st is None or (st.send_done and not st.blocked):
            return
        # aioquic has already reset our sending side.
        st.send_done = True
        st.blocked.clear()
        self._emit_stream(StreamStoppedByPeer(sid), 0)
        self._maybe_forget(sid, st)

    def _maybe_forget(self, sid: int, st: _Stream) -> None:
        if not (st.send_done and not st.blocked) or not (st.recv_done or st.recv_stopped):
            return
        if self._streams.pop(sid, None) is None:
            return
        if not self._is_local(sid):
            self._mark_peer_done(sid)
        if st.first is None:  # it was reported
            self._emit_stream(StreamClosed(sid), 0)

    # -- rtt
    def _on_ping_ack(self, uid: int) -> None:
        if self._ping_sent is None or self._ping_sent[0] != uid:
            return
        sample = max(0.0, self._now - self._ping_sent[1])
        self._ping_sent = None
        self._ping_due = self._now + self._rtt_interval
        self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
        self._emit(RttMeasured(sample, self.rtt))
