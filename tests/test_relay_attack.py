"""Attackers on loopback: a TLS-terminating relay, handshake floods, oversized frames."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
)
from test_quic import RawClient, raw_client, until
from test_quic import sides as sides  # the fixture

from mesh_inference.core.dcf import HEADER, Frame, MessageType, encode_frame
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.net import endpoint as quic
from mesh_inference.net.endpoint import ALPN, DialError

pytestmark = pytest.mark.timeout(60)


class _Leg(QuicConnectionProtocol):
    """One of the relay's two connections; forwards the control stream to ``other``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.other: _Leg | None = None
        self.relay: Relay | None = None
        self.terminated: ConnectionTerminated | None = None
        self.connected = asyncio.Event()

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(sid, data, end_stream=end)
        self.transmit()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.connected.set()
            if self.relay is not None and self.other is None:
                self.relay.accepted(self)  # Alice reached the relay: dial Bob
        elif isinstance(event, StreamDataReceived):
            # Not passed to aioquic's default handling: its StreamWriters send FIN when
            # garbage-collected, and the relay should look as well-behaved as it can.
            if event.stream_id == 0:
                assert self.relay is not None
                self.relay.forward(self, event.data)
            return
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            if self.other is not None and self.other.terminated is None:
                # Bob refused: tell Alice the same (she would time out otherwise).
                self.other.close(error_code=event.error_code, reason_phrase=event.reason_phrase)
        super().quic_event_received(event)


class Relay:
    """Mallory: her own certificate and aioquic endpoints, advertised as a mesh node.

    She accepts Alice's dial, dials Bob herself and copies the control
    stream's bytes both ways. Once proofs have passed through, she tries
    to open a data stream on each side.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.to_alice: _Leg | None = None
        self.to_bob: _Leg | None = None
        self.bytes_forwarded = 0
        self._early: list[bytes] = []  # from Alice while Bob is still being dialed
        self._tasks: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()
        self.port = 0

    async def start(self) -> int:
        mallory = NodeIdentity.generate()
        cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        cfg.certificate, cfg.private_key = mallory.certificate, mallory.private_key
        relay = self

        def leg(quic: QuicConnection, stream_handler: Any = None) -> _Leg:
            proto = _Leg(quic)
            proto.relay = relay
            return proto

        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: QuicServer(configuration=cfg, create_protocol=leg),
            local_addr=("127.0.0.1", 0),
        )
        self._stack.callback(transport.close)
        self.port = int(transport.get_extra_info("sockname")[1])
        return self.port

    def accepted(self, alice: _Leg) -> None:
        self.to_alice = alice
        self._tasks.append(asyncio.get_running_loop().create_task(self._dial_bob(alice)))

    async def _dial_bob(self, alice: _Leg) -> None:
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
        cfg.quantum_readiness_test = True  # as our aioquic dialers do: a qh3 node needs it
        bob = await self._stack.enter_async_context(
            connect("127.0.0.1", self.target_port, configuration=cfg, create_protocol=_Leg)
        )
        assert isinstance(bob, _Leg)
        bob.relay, bob.other, alice.other = self, alice, bob
        self.to_bob = bob
        for data in self._early:
            bob.send(0, data)

    def forward(self, src: _Leg, data: bytes) -> None:
        self.bytes_forwarded += len(data)
        if src is self.to_alice and self.to_bob is None:
            self._early.append(data)
            return
        dst = self.to_bob if src is self.to_alice else self.to_alice
        assert dst is not None
        dst.send(0, data)
        if src is self.to_alice and self.to_bob is not None and self.to_alice is not None:
            # Now try to use the connections: a Task stream to each side.
            task = encode_frame(Frame(MessageType.TASK, 0, 0, b'{"method":"GET","path":"/"}'))
            self.to_bob.send(4, task)
            self.to_alice.send(1, task)

    async def close(self) -> None:
        for leg in (self.to_alice, self.to_bob):
            if leg is not None:
                leg.close()
        for t in self._tasks:
            t.cancel()
        await self._stack.aclose()


async def test_relaying_attacker_is_refused_on_both_sides(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    alice, bob = await sides(mesh), await sides(mesh)
    relay = Relay(bob.port)
    port = await relay.start()
    try:
        # Alice dials "Bob" at the relay's address (e.g. learnt from a forged advert).
        with pytest.raises(DialError, match="mesh secret|before authentication|auth failed"):
            await alice.ep.dial(f"127.0.0.1:{port}", timeout=10)
        await until(lambda: relay.to_bob is not None and relay.to_bob.terminated is not None)
        assert relay.to_bob is not None and relay.to_bob.terminated is not None
        # Bob got Alice's real Hello and Proof, bound to the relay's TLS session with Alice.
        assert relay.bytes_forwarded > 0
        assert "mesh secret" in relay.to_bob.terminated.reason_phrase
        assert alice.connected == [] and bob.connected == []
        assert alice.streams == [] and bob.streams == []
        assert alice.ep.peers() == [] and bob.ep.peers() == []
    finally:
        await relay.close()
    # Both still work for honest peers.
    assert await alice.ep.dial(bob.addr) == bob.node_id


async def test_handshake_flood_is_capped_and_expires(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    b = await sides(mesh, max_handshaking=4, handshake_timeout=5.0)
    async with contextlib.AsyncExitStack() as stack:
        squatters = [await stack.enter_async_context(await raw_client(b.port)) for _ in range(4)]
        # The fifth stranger is not even answered.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await stack.enter_async_context(await raw_client(b.port))
        # The squatters never authenticate: the deadline closes them, and the slots free up.
        async with asyncio.timeout(20):
            for client in squatters:
                await client.wait_closed()
        assert {c.close_reason() for c in squatters} == {"handshake timed out"}
    a = await sides(mesh)
    assert await a.ep.dial(b.addr) == a.ep.peers()[0]
    assert b.connected and b.connected[0].peer_id == a.node_id


async def test_oversized_control_frame_before_authentication_is_refused(sides: Any) -> None:
    b = await sides(MeshCredentials.generate())
    async with await raw_client(b.port) as client:
        assert isinstance(client, RawClient)
        # Only the 17-byte header of a 1 MiB Hello: refused without waiting for the payload.
        client._quic.send_stream_data(0, HEADER.pack(int(MessageType.HELLO), 0, 0, 1 << 20))
        client.transmit()
        async with asyncio.timeout(10):
            await client.wait_closed()
        assert "exceeds limit of 4096" in client.close_reason()
    assert b.connected == []


async def test_late_data_after_the_handler_hung_up_keeps_the_connection(sides: Any) -> None:
    mesh = MeshCredentials.generate()
    hung_up = asyncio.Event()

    async def hang_up(peer: str, first: Frame, reader: Any, writer: Any) -> None:
        writer.close()
        hung_up.set()

    a, b = await sides(mesh), await sides(mesh, handler=hang_up)
    peer = await a.ep.dial(b.addr)
    for _ in range(3):
        hung_up.clear()
        _, writer = await a.ep.open_stream(peer, MessageType.TASK, b"{}")
        await hung_up.wait()
        # Written after the peer forgot the stream: dropped there, not a new stream.
        with contextlib.suppress(ConnectionError):
            writer.write(encode_frame(Frame(MessageType.TASK, 0, 0, b"{}")) * 10)
    a.ep.send_control(peer, MessageType.HEARTBEAT, b"{}")
    await until(lambda: b.frames)
    assert a.lost == [] and b.lost == [] and len(b.streams) == 3



async def test_streams_on_a_superseded_duplicate_never_reach_the_node(
    sides: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold back the duplicate's close, as if the peer had not learnt of it yet.
    superseded: list[quic._Conn] = []
    real_fail = quic._Conn.fail

    def slow_fail(self: quic._Conn, code: int, reason: str, **kw: Any) -> None:
        if reason == "duplicate connection":
            superseded.append(self)
            return
        real_fail(self, code, reason, **kw)

    monkeypatch.setattr(quic._Conn, "fail", slow_fail)
    mesh = MeshCredentials.generate()
    a, b = await sides(mesh), await sides(mesh)
    await a.ep.dial(b.addr)
    await b.ep.dial(a.addr)  # both dialed: one connection per side is superseded
    await until(lambda: len(superseded) == 2)
    for side, other in ((a, b), (b, a)):
        (loser,) = [c for c in superseded if c.endpoint is side.ep]
        kept = side.ep._peers[other.node_id]
        assert kept is not loser and not loser.session.closed
        # The other side still sends a stream over the superseded connection...
        (twin,) = [c for c in superseded if c.endpoint is other.ep]
        reader, _ = twin.new_stream(twin.session.open_stream(MessageType.TASK, b"{}"))
        twin.pump()
        # ... which is reset, never handed to the node.
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(10):
                await reader.read(-1)
    assert a.streams == [] and b.streams == []
    assert a.lost == [] and b.lost == []
    a.ep.send_control(b.node_id, MessageType.HEARTBEAT, b"{}")
    await until(lambda: b.frames)
