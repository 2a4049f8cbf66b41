"""Real QUIC endpoints on 127.0.0.1: authentication, control frames, streams, failures."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent

from mesh_inference.core.dcf import Frame, FrameDecoder, MessageType, encode_frame
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.net import endpoint as quic
from mesh_inference.net.endpoint import (
    ALPN,
    DialError,
    MeshEndpoint,
    PeerConnection,
    QuicStreamWriter,
    UnknownPeer,
)

pytestmark = pytest.mark.timeout(60)

StreamHandler = Callable[[str, Frame, asyncio.StreamReader, QuicStreamWriter], Any]


@dataclass
class Side:
    ep: MeshEndpoint
    port: int = 0
    connected: list[PeerConnection] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    frames: list[tuple[str, Frame]] = field(default_factory=list)
    streams: list[tuple[str, Frame]] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.ep.identity.node_id

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


async def echo_handler(
    peer: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
) -> None:
    """Echo every byte after the first frame; FIN after the peer's FIN."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def make_side(
    mesh: MeshCredentials,
    handler: StreamHandler = echo_handler,
    **kwargs: Any,
) -> Side:
    side: Side

    async def on_stream(
        peer: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        side.streams.append((peer, first))
        await handler(peer, first, reader, writer)

    kwargs.setdefault("host", "127.0.0.1")
    ep = MeshEndpoint(
        kwargs.pop("identity", None) or NodeIdentity.generate(),
        mesh,
        port=0,
        on_peer_connected=lambda conn: side.connected.append(conn),
        on_peer_lost=lambda peer, reason: side.lost.append((peer, reason)),
        on_control_frame=lambda peer, frame: side.frames.append((peer, frame)),
        on_stream=on_stream,
        **kwargs,
    )
    side = Side(ep)
    side.port = await ep.start()
    return side


async def until(pred: Callable[[], object], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not pred():  # noqa: ASYNC110 (polls state the endpoint owns)
            await asyncio.sleep(0.01)


@pytest.fixture
async def sides() -> AsyncIterator[Callable[..., Any]]:
    made: list[Side] = []

    async def factory(mesh: MeshCredentials, **kwargs: Any) -> Side:
        side = await make_side(mesh, **kwargs)
        made.append(side)
        return side

    yield factory
    for side in made:
        await side.ep.close()


async def test_peers_authenticate_and_exchange_control_frames(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    assert peer == b.node_id
    await until(lambda: b.connected and a.connected)
    (b_conn,) = b.connected
    assert b_conn.peer_id == a.node_id and not b_conn.dialed_by_us
    assert b_conn.pubkey_der == a.ep.identity.public_key_der()
    # One socket dials and accepts: the acceptor sees the dialer's listening port.
    assert b_conn.remote_address == a.addr
    (a_conn,) = a.connected
    assert a_conn.dialed_by_us and a_conn.remote_address == b.addr
    assert a_conn.pubkey_der == b.ep.identity.public_key_der()
    assert a.ep.peers() == [b.node_id] and b.ep.peers() == [a.node_id]

    for i in range(5):
        a.ep.send_control(peer, MessageType.HEARTBEAT, b'{"inc":%d}' % i)
    b.ep.send_control(a.node_id, MessageType.GOSSIP, b'{"records":[]}')
    await until(lambda: len(b.frames) == 5 and a.frames)
    assert [f.payload for _, f in b.frames] == [b'{"inc":%d}' % i for i in range(5)]
    assert all(p == a.node_id and f.type == MessageType.HEARTBEAT for p, f in b.frames)
    assert a.frames == [(b.node_id, a.frames[0][1])]
    assert a.frames[0][1].type == MessageType.GOSSIP
    rtt = a.ep.rtt(peer)
    assert rtt is not None and rtt > 0
    assert a.ep.rtt("0" * 16) is None


async def test_unknown_peer_is_a_key_error(sides: Any) -> None:
    a = await sides(MeshCredentials.generate())
    with pytest.raises(UnknownPeer):
        a.ep.send_control("0" * 16, MessageType.HEARTBEAT, b"{}")
    with pytest.raises(KeyError):
        await a.ep.open_stream("0" * 16, MessageType.OPEN_TUNNEL, b"{}")
    a.ep.disconnect("0" * 16, "nothing")  # no error


async def test_wrong_secret_is_refused(sides: Any) -> None:
    good = await sides(MeshCredentials.generate())
    bad = await sides(MeshCredentials(good.ep.mesh.mesh_id, b"\x01" * 32))
    with pytest.raises(DialError, match="auth failed: the peer does not know the mesh secret"):
        await bad.ep.dial(good.addr)
    await asyncio.sleep(0.2)
    assert good.connected == [] and good.ep.peers() == [] and good.lost == []
    assert bad.connected == [] and bad.ep.peers() == []


async def test_other_mesh_is_refused(sides: Any) -> None:
    a, b = await sides(MeshCredentials.generate()), await sides(MeshCredentials.generate())
    with pytest.raises(DialError, match="another mesh"):
        await b.ep.dial(a.addr)
    assert a.ep.peers() == [] and a.connected == []


async def test_dialing_ourselves_fails(sides: Any) -> None:
    a = await sides(MeshCredentials.generate())
    with pytest.raises(DialError, match="ourselves"):
        await a.ep.dial(a.addr)
    assert a.ep.peers() == [] and a.connected == []


async def test_dial_timeout_and_bad_addresses(sides: Any) -> None:
    a = await sides(MeshCredentials.generate())
    silent = await asyncio.get_running_loop().create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    try:
        port = silent[0].get_extra_info("sockname")[1]
        with pytest.raises(DialError, match="within 0.3 s"):
            await a.ep.dial(f"127.0.0.1:{port}", timeout=0.3)
    finally:
        silent[0].close()
    with pytest.raises(DialError, match="port"):
        await a.ep.dial("127.0.0.1:0")
    with pytest.raises(DialError):
        await a.ep.dial("no-such-host.invalid:1", timeout=2)


async def test_peer_lost_when_the_other_endpoint_closes(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    await a.ep.dial(b.addr)
    await until(lambda: b.connected)
    await a.ep.close()
    await until(lambda: b.lost)
    assert b.lost == [(a.node_id, "shutting down")]
    assert b.ep.peers() == []
    assert a.lost == []  # our own shutdown is not a peer loss


async def test_disconnect_reports_lost_on_both_sides_and_redial_works(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    await a.ep.dial(b.addr)
    await until(lambda: b.connected)
    a.ep.disconnect(b.node_id, "declared dead")
    assert a.ep.peers() == []  # at once
    await until(lambda: a.lost and b.lost)
    assert a.lost == [(b.node_id, "declared dead")]
    assert b.lost == [(a.node_id, "declared dead")]
    assert await b.ep.dial(a.addr) == a.node_id
    await until(lambda: len(a.connected) == 2 and len(b.connected) == 2)
    b.ep.send_control(a.node_id, MessageType.HEARTBEAT, b"{}")
    await until(lambda: a.frames)


async def test_simultaneous_dials_keep_the_connection_dialed_by_the_smaller_id(
    sides: Any,
) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    got = await asyncio.gather(a.ep.dial(b.addr), b.ep.dial(a.addr), return_exceptions=True)
    assert got == [b.node_id, a.node_id]
    await asyncio.sleep(0.3)
    assert a.ep.peers() == [b.node_id] and b.ep.peers() == [a.node_id]
    assert a.lost == [] and b.lost == []
    smaller = min(a, b, key=lambda s: s.node_id)
    larger = b if smaller is a else a
    assert smaller.ep.peer_connection(larger.node_id).dialed_by_us  # type: ignore[union-attr]
    assert not larger.ep.peer_connection(smaller.node_id).dialed_by_us  # type: ignore[union-attr]
    a.ep.send_control(b.node_id, MessageType.HEARTBEAT, b"{}")
    b.ep.send_control(a.node_id, MessageType.HEARTBEAT, b"{}")
    await until(lambda: a.frames and b.frames)


async def test_garbage_on_the_control_stream_drops_only_that_peer(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    await until(lambda: b.connected)
    conn = a.ep._peers[peer]
    # An unknown frame type on the control stream, past the session's own encoder.
    conn.session._quic.send_stream_data(0, b"\xff" * 40)
    conn.pump()
    await until(lambda: b.lost and a.lost)
    assert b.lost[0][0] == a.node_id and "unknown frame type" in b.lost[0][1]
    c = await sides(mesh)
    assert await c.ep.dial(b.addr) == b.node_id


async def test_handshake_frame_after_authentication_drops_the_peer(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    await until(lambda: b.connected)
    with pytest.raises(ValueError, match="handshake"):
        a.ep.send_control(peer, MessageType.HELLO, b"{}")
    conn = a.ep._peers[peer]
    conn.session._send_frame(MessageType.HELLO, b"{}")
    conn.pump()
    await until(lambda: b.lost)
    assert "HELLO after the handshake" in b.lost[0][1]


class RawClient(QuicConnectionProtocol):
    """A plain aioquic client: a stranger that speaks QUIC but not our handshake."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.terminated: ConnectionTerminated | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
        super().quic_event_received(event)

    def close_reason(self) -> str:
        assert self.terminated is not None
        return self.terminated.reason_phrase


async def raw_client(port: int) -> Any:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
    cfg.quantum_readiness_test = True  # as our aioquic dialers do: a qh3 node needs it
    return connect(
        "127.0.0.1", port, configuration=cfg, wait_connected=True, create_protocol=RawClient
    )


async def test_data_stream_before_authentication_closes_the_connection(sides: Any) -> None:
    b = await sides(MeshCredentials.generate())
    async with await raw_client(b.port) as client:
        assert isinstance(client, RawClient)
        client._quic.send_stream_data(4, encode_frame(Frame(MessageType.TASK, 0, 0, b"{}")))
        client.transmit()
        async with asyncio.timeout(10):
            await client.wait_closed()
        reason = client.close_reason()
    assert "before authentication" in reason
    assert b.connected == [] and b.streams == []


async def test_stranger_that_never_says_hello_is_dropped(sides: Any) -> None:
    b = await sides(MeshCredentials.generate(), handshake_timeout=0.3)
    async with await raw_client(b.port) as client:
        async with asyncio.timeout(10):
            await client.wait_closed()
        assert client.close_reason() == "handshake timed out"
    assert b.connected == []


async def test_stream_carries_bytes_after_its_first_frame(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    reader, writer = await a.ep.open_stream(peer, MessageType.OPEN_TUNNEL, b'{"service":"rpc"}')
    payload = bytes(range(256)) * 4096  # 1 MiB
    writer.write(payload)
    await writer.drain()
    assert writer.blocked_bytes() == 0  # drain() returns once the credit covers everything
    writer.write_eof()  # half-close: the echo keeps coming back
    got = await reader.read(-1)
    assert got == payload
    assert b.streams == [(a.node_id, b.streams[0][1])]
    first = b.streams[0][1]
    assert first.type == MessageType.OPEN_TUNNEL and first.payload == b'{"service":"rpc"}'
    writer.close()
    await writer.wait_closed()


async def test_task_stream_frames_pass_through_unchanged(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    reader, writer = await a.ep.open_stream_raw(peer)
    frames = [
        Frame(MessageType.TASK, 0, 1, b'{"method":"GET"}'),
        Frame(MessageType.BODY, 1, 2, b"\x00\x01body"),
        Frame(MessageType.BODY, 2, 3, b""),
    ]
    writer.write(b"".join(encode_frame(f) for f in frames))  # one write: one packet
    writer.write_eof()
    echoed = FrameDecoder(first_seq=1).feed(await reader.read(-1))
    assert echoed == frames[1:]
    assert b.streams[0][1] == frames[0]


async def test_two_open_streams_get_distinct_ids(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    (_, w1), (_, w2) = await a.ep.open_stream_raw(peer), await a.ep.open_stream_raw(peer)
    assert w1.stream_id != w2.stream_id


@pytest.mark.parametrize(
    "first_type", [MessageType.HEARTBEAT, MessageType.HELLO], ids=lambda t: t.name
)
async def test_stream_with_an_unknown_first_frame_drops_the_peer(
    sides: Any, first_type: MessageType
) -> None:
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    _, writer = await a.ep.open_stream_raw(peer)
    writer.write(encode_frame(Frame(first_type, 0, 0, b"{}")))
    await until(lambda: b.lost)
    assert f"opened with {first_type.name}" in b.lost[0][1]
    assert b.streams == []


async def test_late_data_on_a_stream_the_handler_closed_is_ignored(sides: Any) -> None:
    mesh = MeshCredentials.generate()

    async def hang_up(
        peer: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        writer.close()

    a = await sides(mesh)
    b = await sides(mesh, handler=hang_up)
    peer = await a.ep.dial(b.addr)
    reader, writer = await a.ep.open_stream(peer, MessageType.TASK, b"{}")
    with pytest.raises(ConnectionError):
        async with asyncio.timeout(10):
            while True:
                writer.write(b"x" * 10_000)
                await writer.drain()
                await asyncio.sleep(0.01)
    with pytest.raises(ConnectionError):
        await reader.read(-1)
    # The connection itself is fine.
    a.ep.send_control(peer, MessageType.HEARTBEAT, b"{}")
    await until(lambda: b.frames)
    assert b.lost == [] and a.lost == []


async def test_streams_fail_when_the_connection_goes(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    started = asyncio.Event()

    async def wait_forever(
        peer: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        started.set()
        await reader.read(-1)

    a = await sides(mesh)
    b = await sides(mesh, handler=wait_forever)
    peer = await a.ep.dial(b.addr)
    reader, writer = await a.ep.open_stream(peer, MessageType.TASK, b"{}")
    await started.wait()
    await b.ep.close()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(10):
            await reader.read(-1)
    with pytest.raises(ConnectionResetError):
        writer.write(b"more")
    assert writer.is_closing()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_dial_across_address_families(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    v4 = await sides(mesh)
    v6 = await sides(mesh, host="::1")
    assert await v4.ep.dial(f"[::1]:{v6.port}") == v6.node_id
    await until(lambda: v6.connected)
    assert v6.connected[0].remote_address.startswith("[::1]:")
    v4.ep.send_control(v6.node_id, MessageType.HEARTBEAT, b"{}")
    await until(lambda: v6.frames)
    # The v6 endpoint dials v4 addresses from a socket of its own.
    third = await sides(mesh)
    assert await v6.ep.dial(third.addr) == third.node_id
    await v6.ep.close()
    await until(lambda: v4.lost and third.lost)


def test_bad_settings_are_refused() -> None:
    args: dict[str, Any] = {
        "on_peer_connected": print,
        "on_peer_lost": print,
        "on_control_frame": print,
        "on_stream": echo_handler,
    }
    ident, mesh = NodeIdentity.generate(), MeshCredentials.generate()
    with pytest.raises(ValueError, match="max_datagram_size"):
        MeshEndpoint(ident, mesh, max_datagram_size=1000, **args)
    with pytest.raises(ValueError, match="timeouts"):
        MeshEndpoint(ident, mesh, idle_timeout=0, **args)


async def test_restarted_peer_replaces_its_silent_old_connection(
    sides: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quic, "STALE_AFTER", 0.2)
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    if a.node_id > b.node_id:
        a, b = b, a
    await a.ep.dial(b.addr)  # the smaller id dialed: by the rule, this one is kept
    await until(lambda: b.connected)
    assert b.ep._sock is not None
    b.ep._sock.close()  # b "crashes": no CONNECTION_CLOSE, its socket is gone
    await asyncio.sleep(0.3)
    reborn = await sides(mesh, identity=b.ep.identity)
    assert await reborn.ep.dial(a.addr) == a.node_id
    await asyncio.sleep(0.1)
    assert a.ep.peers() == [b.node_id] and a.lost == []
    assert a.ep.peer_connection(b.node_id).remote_address == reborn.addr  # type: ignore[union-attr]
    a.ep.send_control(b.node_id, MessageType.HEARTBEAT, b"{}")
    await until(lambda: reborn.frames)


# ---------------------------------------------------------------- the edge's batching
async def test_a_burst_is_read_as_a_batch_and_delivered_in_order(
    sides: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every waiting datagram is read per readiness event and the connection pumped once
    per batch, not once per datagram; the bytes still arrive whole and in order."""
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    counts = {"received": 0, "pumps": 0}
    real_receive, real_pump = quic._Conn.receive, quic._Conn.pump

    def receive(self: Any, *args: Any) -> None:
        counts["received"] += 1
        real_receive(self, *args)

    def pump(self: Any) -> None:
        counts["pumps"] += 1
        real_pump(self)

    monkeypatch.setattr(quic._Conn, "receive", receive)
    monkeypatch.setattr(quic._Conn, "pump", pump)
    reader, writer = await a.ep.open_stream(peer, MessageType.OPEN_TUNNEL, b"{}")
    # Numbered records in many small writes: any reordering or loss shows.
    records = [i.to_bytes(4, "big") * 50 for i in range(5000)]  # 1 MB in 5000 writes
    for rec in records:
        writer.write(rec)
    await writer.drain()
    writer.write_eof()
    got = await reader.read(-1)
    assert got == b"".join(records)
    # Far fewer pumps than datagrams received: a's 5000 writes pump once each; the
    # rest (reading batches, b's echo writes of what each batch brought) are few.
    assert counts["received"] > 1000
    assert counts["pumps"] - len(records) < counts["received"] // 3


async def test_the_timer_is_rearmed_only_when_the_deadline_moves_earlier(sides: Any) -> None:
    """Every packet sent pushes aioquic's loss timer later: that must not cancel and re-create
    the event-loop timer each time; it fires at the old deadline and re-arms then."""
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    conn = a.ep._peers[peer]
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    real_call_later = loop.call_later

    def call_later(delay: float, cb: Any, *args: Any) -> asyncio.TimerHandle:
        if getattr(cb, "__self__", None) is conn:
            armed.append(delay)
        return real_call_later(delay, cb, *args)

    loop.call_later = call_later  # type: ignore[method-assign]
    try:
        reader, writer = await a.ep.open_stream(peer, MessageType.OPEN_TUNNEL, b"{}")
        for _ in range(300):  # 300 round trips, each sending and acknowledging packets
            writer.write(b"x" * 64)
            await reader.readexactly(64)
    finally:
        loop.call_later = real_call_later  # type: ignore[method-assign]
    assert len(armed) < 300
    assert conn._timer is not None and conn._timer_at is not None
    # Whatever is armed is never later than what the session asks for.
    session_at = conn.session.get_timer()
    assert session_at is not None and conn._timer_at <= session_at


class _FullSocket:
    """A UDP socket whose kernel send buffer is 'full' for the first ``fail`` sends."""

    def __init__(self, real: socket.socket, fail: int) -> None:
        self._real = real
        self.fail = fail
        self.refused = 0

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.fail > 0:
            self.fail -= 1
            self.refused += 1
            raise BlockingIOError
        return self._real.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_datagrams_wait_while_the_send_buffer_is_full(sides: Any) -> None:
    """EAGAIN from sendto queues the datagrams (in order) until the socket is writable."""
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    peer = await a.ep.dial(b.addr)
    udp = a.ep._sock
    assert udp is not None
    full = _FullSocket(udp._sock, fail=3)  # type: ignore[arg-type]
    udp._sock = full  # type: ignore[assignment]
    reader, writer = await a.ep.open_stream(peer, MessageType.OPEN_TUNNEL, b"{}")
    payload = os.urandom(200_000)
    writer.write(payload)
    writer.write_eof()
    got = await reader.read(-1)
    assert got == payload
    assert full.refused == 3 and not udp._backlog
