"""PeerSession, sans-I/O: two sessions over an in-memory network with a manual clock."""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mesh_inference.core import session as sess
from mesh_inference.core.dcf import HEADER, Frame, FrameDecoder, MessageType, encode_frame
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.core.messages import Credit, encode_payload
from mesh_inference.core.quicstack import QuicConnection, parse_destination
from mesh_inference.core.session import (
    CID_LENGTH,
    ERR_AUTH,
    ERR_PROTOCOL,
    STREAM_WINDOW,
    ControlFrameReceived,
    PeerAuthenticated,
    PeerSession,
    RttMeasured,
    SessionClosed,
    SessionEvent,
    SessionTerminated,
    StreamClosed,
    StreamDataReceived,
    StreamOpened,
    StreamResetByPeer,
    StreamStoppedByPeer,
    StreamWritable,
    quic_configuration,
)

MESH = MeshCredentials.generate()
ALICE, BOB = NodeIdentity.generate(), NodeIdentity.generate()
ADDR_D, ADDR_A = ("10.0.0.1", 4433), ("10.0.0.2", 4433)
TUNNEL = (MessageType.OPEN_TUNNEL, b'{"service":"rpc"}')


@dataclass
class Side:
    session: PeerSession | None
    addr: tuple[str, int]
    events: list[SessionEvent] = field(default_factory=list)
    rx: dict[int, bytearray] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)

    def record(self, ev: SessionEvent) -> None:
        self.events.append(ev)
        if isinstance(ev, StreamDataReceived):
            self.rx.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            if ev.end:
                self.ended.add(ev.stream_id)

    @property
    def s(self) -> PeerSession:
        assert self.session is not None
        return self.session

    def of(self, kind: type[SessionEvent]) -> list[SessionEvent]:
        return [e for e in self.events if isinstance(e, kind)]

    def data(self, sid: int) -> bytes:
        return bytes(self.rx.get(sid, b""))

    def received(self, sid: int) -> int:
        return len(self.rx.get(sid, b""))


class Net:
    """Datagrams take ``latency`` seconds; ``drop`` decides which ones get lost."""

    def __init__(
        self,
        dialer: NodeIdentity = ALICE,
        acceptor: NodeIdentity = BOB,
        *,
        d_mesh: MeshCredentials = MESH,
        a_mesh: MeshCredentials = MESH,
        latency: float = 0.0005,
        handshake_timeout: float = 5.0,
    ) -> None:
        self.now = 1000.0
        self.latency = latency
        self.drop: Callable[[bytes], bool] = lambda data: False
        self._acceptor, self._a_mesh = acceptor, a_mesh
        self._hs_timeout = handshake_timeout
        cfg = quic_configuration(dialer, is_client=True, max_datagram_size=1452, idle_timeout=15)
        self.d = Side(
            PeerSession(
                QuicConnection(configuration=cfg), dialer, d_mesh, now=self.now,
                handshake_timeout=handshake_timeout,
            ),
            ADDR_D,
        )
        self.a = Side(None, ADDR_A)
        self._queue: list[tuple[float, int, Side, bytes]] = []
        self._seq = itertools.count()
        self.d.s.connect(ADDR_A, self.now)

    def _accept(self, data: bytes) -> PeerSession:
        header = parse_destination(data, CID_LENGTH)
        assert header is not None and header.is_initial
        cfg = quic_configuration(
            self._acceptor, is_client=False, max_datagram_size=1452, idle_timeout=15
        )
        quic = QuicConnection(
            configuration=cfg, original_destination_connection_id=header.destination_cid
        )
        return PeerSession(
            quic, self._acceptor, self._a_mesh, now=self.now, handshake_timeout=self._hs_timeout
        )

    def _flush(self) -> None:
        for side, other in ((self.d, self.a), (self.a, self.d)):
            if side.session is None:
                continue
            while True:
                for data, _addr in side.s.datagrams_to_send(self.now):
                    if not self.drop(data):
                        heapq.heappush(
                            self._queue, (self.now + self.latency, next(self._seq), other, data)
                        )
                before = len(side.events)
                while (ev := side.s.next_event()) is not None:
                    side.record(ev)
                if len(side.events) == before:
                    break

    def run(self, until: Callable[[], object] = lambda: False, limit: float = 30.0) -> None:
        """Advance time until ``until()`` holds or nothing is left to happen (or ``limit``)."""
        end = self.now + limit
        self._flush()
        while not until():
            timers = [
                (t, side)
                for side in (self.d, self.a)
                if side.session is not None and (t := side.s.get_timer()) is not None
            ]
            nxt = min([t for t, _ in timers] + [q[0] for q in self._queue[:1]], default=None)
            if nxt is None or nxt > end:
                return
            self.now = max(self.now, nxt)
            if self._queue and self._queue[0][0] <= self.now:
                _, _, dst, data = heapq.heappop(self._queue)
                if dst.session is None:
                    dst.session = self._accept(data)
                src = self.d if dst is self.a else self.a
                dst.s.receive_datagram(data, src.addr, self.now)
            else:
                for t, side in timers:
                    if t <= self.now:
                        side.s.handle_timer(self.now)
            self._flush()

    def authenticate(self) -> None:
        self.run(lambda: self.d.s.authenticated and self.a.session and self.a.s.authenticated)
        assert self.d.s.authenticated and self.a.s.authenticated


def test_handshake_authenticates_both_sides_with_one_binding() -> None:
    net = Net()
    net.authenticate()
    (d_auth,) = net.d.of(PeerAuthenticated)
    (a_auth,) = net.a.of(PeerAuthenticated)
    assert d_auth == PeerAuthenticated(BOB.node_id, BOB.public_key_der())
    assert a_auth == PeerAuthenticated(ALICE.node_id, ALICE.public_key_der())
    assert net.d.s.peer_id == BOB.node_id and net.a.s.peer_id == ALICE.node_id
    # Equal on both ends of one TLS session ...
    assert net.d.s.channel_binding is not None and len(net.d.s.channel_binding) in (32, 48)
    assert net.d.s.channel_binding == net.a.s.channel_binding
    # ... and different for another session between the very same nodes.
    other = Net()
    other.authenticate()
    assert other.d.s.channel_binding == other.a.s.channel_binding
    assert other.d.s.channel_binding != net.d.s.channel_binding


def test_control_frames_pass_through_and_rtt_is_measured() -> None:
    net = Net(latency=0.005)
    net.authenticate()
    net.d.s.send_control(MessageType.HEARTBEAT, b'{"inc":1}')
    net.a.s.send_control(MessageType.GOSSIP, b'{"records":[]}')
    net.run(lambda: net.a.of(ControlFrameReceived) and net.d.of(RttMeasured))
    (got,) = net.a.of(ControlFrameReceived)
    assert isinstance(got, ControlFrameReceived)
    assert got.frame.type == MessageType.HEARTBEAT and got.frame.payload == b'{"inc":1}'
    rtt = net.d.s.rtt
    # Two one-way trips of 5 ms, plus at most the peer's 1 ms ack delay.
    assert rtt is not None and 0.010 - 1e-9 <= rtt <= 0.0125
    # A ping every RTT_INTERVAL keeps measuring.
    n = len(net.d.of(RttMeasured))
    net.run(lambda: len(net.d.of(RttMeasured)) > n + 1, limit=10)
    assert len(net.d.of(RttMeasured)) > n + 1
    with pytest.raises(ValueError, match="belong to the session"):
        net.d.s.send_control(MessageType.CREDIT, b"{}")
    with pytest.raises(ValueError, match="belongs to the handshake"):
        net.d.s.send_control(MessageType.HELLO, b"{}")


def test_wrong_secret_closes_with_auth_failed() -> None:
    net = Net(d_mesh=MeshCredentials(MESH.mesh_id, b"\x02" * 32))
    net.run(lambda: net.d.of(SessionClosed))
    (closed,) = net.a.of(SessionClosed)
    assert isinstance(closed, SessionClosed) and closed.code == ERR_AUTH
    assert "does not know the mesh secret" in closed.reason and not closed.by_peer
    (d_closed,) = net.d.of(SessionClosed)
    assert isinstance(d_closed, SessionClosed) and d_closed.by_peer
    assert "does not know the mesh secret" in d_closed.reason
    assert not net.d.s.authenticated and not net.a.s.authenticated


def open_and_send(net: Net, payload: bytes, *, end: bool = True) -> int:
    sid = net.d.s.open_stream(*TUNNEL)
    net.d.s.send_data(sid, payload)
    if end:
        net.d.s.end_stream(sid)
    return sid


def test_stream_open_data_and_fin_both_ways() -> None:
    net = Net()
    net.authenticate()
    sid = open_and_send(net, b"hello")
    net.run(lambda: sid in net.a.ended)
    (opened,) = net.a.of(StreamOpened)
    assert isinstance(opened, StreamOpened) and opened.stream_id == sid
    assert opened.first_frame.type == MessageType.OPEN_TUNNEL
    assert opened.first_frame.payload == b'{"service":"rpc"}'
    assert net.a.data(sid) == b"hello"
    net.a.s.send_data(sid, b"world")
    net.a.s.end_stream(sid)
    net.run(lambda: net.d.of(StreamClosed) and net.a.of(StreamClosed))
    assert net.d.data(sid) == b"world"
    assert not net.d.s.has_stream(sid) and not net.a.s.has_stream(sid)


def test_credit_bounds_what_is_in_flight_and_is_granted_as_consumed() -> None:
    net = Net()
    net.authenticate()
    sid = net.d.s.open_stream(*TUNNEL)
    first_len = len(encode_frame(Frame(*TUNNEL[:1], 0, 0, TUNNEL[1])))
    big = bytes(3 * STREAM_WINDOW)
    net.d.s.send_data(sid, big)
    net.d.s.end_stream(sid)
    # Nothing consumed: the sender stops at the window (the first frame counts too).
    net.run(lambda: False, limit=5)
    received = net.a.received(sid)
    assert received == STREAM_WINDOW - first_len
    assert net.d.s.blocked_bytes(sid) == len(big) - received
    assert not net.d.of(StreamWritable)
    # Consuming grants credit; the rest flows, then FIN.
    consumed = 0
    while sid not in net.a.ended:
        total = net.a.received(sid)
        net.a.s.consumed(sid, total - consumed)
        consumed = total
        net.run(lambda n=total: net.a.received(sid) > n or sid in net.a.ended, limit=5)
        # Never more than the window beyond what was consumed.
        assert net.a.received(sid) + first_len - consumed <= STREAM_WINDOW
    assert net.a.data(sid) == big
    assert net.d.of(StreamWritable) == [StreamWritable(sid)]
    assert net.d.s.blocked_bytes(sid) == 0


def test_sending_beyond_credit_is_a_protocol_error() -> None:
    net = Net()
    net.authenticate()
    sid = net.d.s.open_stream(*TUNNEL)
    # Bypass the session's own accounting, like a hostile peer would.
    net.d.s._quic.send_stream_data(sid, bytes(STREAM_WINDOW))
    net.run(lambda: net.a.of(SessionClosed))
    (closed,) = net.a.of(SessionClosed)
    assert isinstance(closed, SessionClosed) and closed.code == ERR_PROTOCOL
    assert "beyond its credit" in closed.reason
    assert net.a.of(StreamOpened)  # it was a stream, refused for its size


def test_credit_for_bytes_never_sent_is_a_protocol_error() -> None:
    net = Net()
    net.authenticate()
    sid = open_and_send(net, b"x", end=False)
    net.run(lambda: net.a.of(StreamOpened))
    net.a.s._send_frame(MessageType.CREDIT, encode_payload(Credit(sid, 1000)))
    net.run(lambda: net.d.of(SessionClosed))
    (closed,) = net.d.of(SessionClosed)
    assert isinstance(closed, SessionClosed) and "never sent" in closed.reason


def test_handshake_deadline_closes_an_unauthenticated_session() -> None:
    net = Net(handshake_timeout=2.0)
    net.drop = lambda data: net.a.session is not None and net.a.s.channel_binding is not None
    start = net.now
    net.run(lambda: net.a.of(SessionClosed))
    (closed,) = net.a.of(SessionClosed)
    assert isinstance(closed, SessionClosed) and closed.reason == "handshake timed out"
    assert closed.code == ERR_AUTH and net.now - start == pytest.approx(2.0, abs=0.01)
    net.run(lambda: net.a.of(SessionTerminated))
    assert net.a.s.terminated and net.a.s.get_timer() is None


def test_data_stream_before_authentication_closes() -> None:
    net = Net()
    # The dialer opens a stream as soon as TLS is up, before the handshake.
    net.run(lambda: net.d.s.channel_binding is not None)
    net.d.s._quic.send_stream_data(4, encode_frame(Frame(MessageType.TASK, 0, 0, b"{}")))
    net.run(lambda: net.a.of(SessionClosed))
    (closed,) = net.a.of(SessionClosed)
    assert isinstance(closed, SessionClosed) and "before authentication" in closed.reason
    assert not net.a.of(StreamOpened)


def test_big_control_frame_before_authentication_is_refused_on_its_header() -> None:
    net = Net()
    net.run(lambda: net.a.session is not None and net.a.s.channel_binding is not None)
    header = HEADER.pack(int(MessageType.HELLO), 0, 0, 1 << 20)
    net.d.s._quic.send_stream_data(0, header)  # just the header of a 1 MiB Hello
    net.d.s._hs = None  # keep the dialer's own Hello out of the way
    net.run(lambda: net.a.of(SessionClosed))
    (closed,) = net.a.of(SessionClosed)
    assert isinstance(closed, SessionClosed) and "exceeds limit of 4096" in closed.reason


def test_control_frames_may_be_big_after_authentication() -> None:
    net = Net()
    net.authenticate()
    payload = b'{"records":[]' + b" " * 100_000 + b"}"
    net.a.s.send_control(MessageType.GOSSIP, payload)
    net.run(lambda: net.d.of(ControlFrameReceived))
    (got,) = net.d.of(ControlFrameReceived)
    assert isinstance(got, ControlFrameReceived) and got.frame.payload == payload


def test_late_data_on_a_forgotten_stream_is_dropped() -> None:
    net = Net()
    net.authenticate()
    sid = open_and_send(net, b"first", end=False)
    net.run(lambda: net.a.of(StreamOpened))
    net.a.s.close_stream(sid)  # the handler hung up: reset + stop sending
    assert not net.a.s.has_stream(sid)
    # Data in flight crosses the STOP_SENDING, even bytes that look like a fresh
    # first frame: they are late, not a new stream.
    net.d.s.send_data(sid, b"late")
    net.d.s.send_data(sid, encode_frame(Frame(MessageType.TASK, 0, 0, b"{}")))
    net.run(lambda: net.d.of(StreamStoppedByPeer) and net.d.of(StreamResetByPeer))
    net.run(lambda: False, limit=1)
    assert not net.a.of(SessionClosed) and not net.d.of(SessionClosed)
    assert len(net.a.of(StreamOpened)) == 1 and net.a.data(sid) == b"first"
    net.d.s.send_control(MessageType.HEARTBEAT, b"{}")
    net.run(lambda: net.a.of(ControlFrameReceived))


def test_refused_streams_are_reset_and_never_reported() -> None:
    net = Net()
    net.authenticate()
    net.a.s.refuse_streams()  # e.g. superseded by a duplicate connection
    sid = open_and_send(net, b"data", end=False)
    net.run(lambda: net.d.of(StreamResetByPeer))
    assert net.d.of(StreamResetByPeer) == [StreamResetByPeer(sid)]
    assert not net.a.of(StreamOpened) and not net.a.of(SessionClosed)


def test_stream_with_a_non_stream_first_frame_closes() -> None:
    net = Net()
    net.authenticate()
    sid = net.d.s.open_stream_raw()
    net.d.s.send_data(sid, encode_frame(Frame(MessageType.HEARTBEAT, 0, 0, b"{}")))
    net.run(lambda: net.a.of(SessionClosed))
    (closed,) = net.a.of(SessionClosed)
    assert isinstance(closed, SessionClosed) and "opened with HEARTBEAT" in closed.reason


def test_local_close_is_reported_at_once_and_the_peer_learns_the_reason() -> None:
    net = Net()
    net.authenticate()
    net.d.s.close("declared dead")
    assert net.d.s.closed
    net.run(lambda: net.a.of(SessionClosed) and net.d.of(SessionTerminated))
    (closed,) = net.a.of(SessionClosed)
    assert closed == SessionClosed("declared dead", 0, True)
    with pytest.raises(ConnectionResetError):
        net.d.s.open_stream(*TUNNEL)


def test_first_frame_and_payload_split_across_packets() -> None:
    net = Net()
    net.authenticate()
    sid = net.d.s.open_stream_raw()
    frame = encode_frame(Frame(MessageType.TASK, 0, 0, b'{"method":"GET"}'))
    for i in range(len(frame)):  # one byte at a time
        net.d.s.send_data(sid, frame[i : i + 1])
        net.run(lambda: False, limit=0.01)
    net.d.s.send_data(sid, b"rest")
    net.d.s.end_stream(sid)
    net.run(lambda: net.a.data(sid) == b"rest")
    (opened,) = net.a.of(StreamOpened)
    assert isinstance(opened, StreamOpened) and opened.first_frame.type == MessageType.TASK
    assert FrameDecoder().feed(frame)[0] == opened.first_frame


def test_the_session_module_is_sans_io() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(sess))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "time", "selectors", "threading"}


def test_no_datagram_is_larger_than_the_configured_size() -> None:
    """1452 B is a LAN's limit: no probe or coalesced packet may exceed it (on either stack)."""
    net = Net()
    sizes: list[int] = []

    def record(data: bytes) -> bool:
        sizes.append(len(data))
        return False

    net.drop = record
    net.authenticate()
    sid = open_and_send(net, bytes(1 << 20))
    net.run(lambda: net.a.received(sid) >= STREAM_WINDOW // 8, limit=10)
    net.run(lambda: False, limit=2)  # long enough for path-MTU probes, if any were sent
    assert len(sizes) > 100 and max(sizes) <= 1452


def test_sending_to_a_peer_that_closed_is_a_connection_error_on_every_stack() -> None:
    """Between the peer's CONNECTION_CLOSE and the stack's termination event (its draining
    period), qh3 raises on sends: that must surface as ConnectionResetError and end the
    session, never escape as the stack's own exception (it stopped a node's heartbeats)."""
    net = Net()
    net.authenticate()
    sid = open_and_send(net, b"x", end=False)
    net.a.s.close("going away")
    net.run(lambda: net.d.s.closed or bool(net.d.of(SessionClosed)), limit=0.01)
    for send in (
        lambda: net.d.s.send_control(MessageType.HEARTBEAT, b'{"inc":9}'),
        lambda: net.d.s.send_data(sid, b"more"),
    ):
        # aioquic takes the send (the connection is draining); qh3 refuses it: both fine.
        with contextlib.suppress(ConnectionResetError):
            send()
    net.run(lambda: net.d.s.terminated, limit=30)
    assert net.d.s.terminated and net.d.s.get_timer() is None
