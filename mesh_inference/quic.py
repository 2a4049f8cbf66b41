"""The QUIC endpoint (aioquic): accept and dial peers, authenticate, carry streams.

One authenticated QUIC connection per peer. Stream 0 (the dialer's first
bidirectional stream) is the *control stream*: DCF frames, first the
handshake (auth.py), then Heartbeat/Gossip/Goodbye, handed to
``on_control_frame``. Every other stream starts with one DCF frame that says
what it is (OpenTunnel, Task); the endpoint decodes that frame and passes it
with an (asyncio.StreamReader, QuicStreamWriter) pair to ``on_stream``.

API::

    ep = MeshEndpoint(identity, mesh, host=..., port=..., on_peer_connected=...,
                      on_peer_lost=..., on_control_frame=..., on_stream=...)
    port = await ep.start()
    peer_id = await ep.dial("10.0.0.2:9337")
    ep.send_control(peer_id, MessageType.HEARTBEAT, payload)
    reader, writer = await ep.open_stream(peer_id, MessageType.OPEN_TUNNEL, payload)
    reader, writer = await ep.open_stream_raw(peer_id)   # caller writes the first frame
    ep.disconnect(peer_id, reason); ep.peers(); ep.rtt(peer_id); await ep.close()

Before the handshake completes, any other stream, an unexpected frame or a
DCF protocol error closes that connection with the reason logged; the
endpoint itself never fails because of a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography.hazmat.primitives import serialization

from .auth import AuthFailed, Handshake
from .dcf import Frame, FrameDecoder, FrameEncoder, MessageType, ProtocolError, encode_frame
from .identity import MeshCredentials, NodeIdentity
from .jointoken import parse_addr

log = logging.getLogger(__name__)

ALPN = "mesh-inference/1"
CONTROL_STREAM = 0
# A stream's writer waits in drain() while more than this is unacknowledged.
HIGH_WATER = 1 << 20
# Flow-control windows: wide enough that model loading is not window-bound.
MAX_DATA = 64 << 20
MAX_STREAM_DATA = 16 << 20
MAX_FIRST_FRAME = 64 << 10
MAX_STREAMS_PER_PEER = 256
ERR_PROTOCOL = 0x1
ERR_AUTH = 0x2
ERR_DUPLICATE = 0x3


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class PeerConnection:
    peer_id: str
    pubkey_der: bytes
    remote_address: str
    dialed_by_us: bool


StreamHandler = Callable[[str, Frame, asyncio.StreamReader, "QuicStreamWriter"], Awaitable[None]]


class QuicStreamWriter:
    """asyncio.StreamWriter's interface over one QUIC stream, with real backpressure."""

    def __init__(self, proto: _MeshProtocol, stream_id: int) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self._eof_sent = False
        self._closed = False

    def write(self, data: bytes) -> None:
        if self._closed or self._eof_sent:
            raise ConnectionResetError("stream is closed")
        if self._proto.terminated:
            raise ConnectionResetError("connection is closed")
        if data:
            self._proto._quic.send_stream_data(self.stream_id, bytes(data))
            self._proto.transmit()

    def _buffered(self) -> int:
        stream = self._proto._quic._streams.get(self.stream_id)
        if stream is None:
            return 0
        return len(stream.sender._buffer)

    async def drain(self) -> None:
        while not self._closed and not self._proto.terminated and self._buffered() > HIGH_WATER:
            await self._proto.wait_progress()
        if self._proto.terminated:
            raise ConnectionResetError("connection is closed")

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closed or self._eof_sent or self._proto.terminated:
            return
        self._eof_sent = True
        self._proto._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        self._proto.transmit()
        self._proto._maybe_forget(self.stream_id)

    def is_closing(self) -> bool:
        return self._closed or self._eof_sent or self._proto.terminated

    def abort_send(self) -> None:
        if self._eof_sent or self._closed or self._proto.terminated:
            return
        self._eof_sent = True
        with contextlib.suppress(Exception):
            self._proto._quic.reset_stream(self.stream_id, 0)
        self._proto.transmit()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._proto.terminated:
            return
        quic = self._proto._quic
        with contextlib.suppress(Exception):
            if not self._eof_sent:
                quic.reset_stream(self.stream_id, 0)
            reader = self._proto._readers.get(self.stream_id)
            if reader is not None and not reader.at_eof():
                quic.stop_stream(self.stream_id, 0)
        self._proto.transmit()
        self._proto._forget(self.stream_id)

    async def wait_closed(self) -> None:
        await asyncio.sleep(0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "stream_id":
            return self.stream_id
        if name == "peername":
            return self._proto.remote_address
        return default


class _MeshProtocol(QuicConnectionProtocol):
    """One peer connection: handshake on the control stream, then frames and streams."""

    def __init__(self, quic: QuicConnection, endpoint: MeshEndpoint, dialer: bool) -> None:
        super().__init__(quic)
        self.endpoint = endpoint
        self.dialer = dialer
        self.terminated = False
        self.peer: PeerConnection | None = None
        self.superseded = False
        self.remote_address = "?"
        self._handshake = Handshake(endpoint.identity, endpoint.mesh, is_dialer=dialer)
        self._control_decoder = FrameDecoder()
        self._control_encoder = FrameEncoder()
        self._readers: dict[int, asyncio.StreamReader] = {}
        self._writers: dict[int, QuicStreamWriter] = {}
        self._pending_first: dict[int, FrameDecoder] = {}
        self._progress = asyncio.Event()
        self.authenticated: asyncio.Future[PeerConnection] = (
            asyncio.get_running_loop().create_future()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)

    def start_handshake(self) -> None:
        self._send_handshake_frames()

    def _send_handshake_frames(self) -> None:
        for mtype, payload in self._handshake.pop_frames():
            self._send_control_raw(mtype, payload)

    def _send_control_raw(self, mtype: MessageType, payload: bytes) -> None:
        data = self._control_encoder.encode(mtype, payload, _now_us())
        self._quic.send_stream_data(CONTROL_STREAM, data)
        self.transmit()

    def send_control(self, mtype: MessageType, payload: bytes) -> None:
        if self.terminated:
            raise ConnectionResetError("connection is closed")
        self._send_control_raw(mtype, payload)

    def fail(self, code: int, reason: str) -> None:
        if self.terminated:
            return
        log.warning("closing connection to %s: %s", self._who(), reason)
        self.close(error_code=code, reason_phrase=reason[:200])

    def _who(self) -> str:
        return self.peer.peer_id if self.peer else self.remote_address

    async def wait_progress(self) -> None:
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), 0.5)

    def rtt(self) -> float | None:
        rec = getattr(self._quic, "_loss", None)
        srtt = getattr(rec, "_rtt_smoothed", None)
        initialized = getattr(rec, "_rtt_initialized", True)
        return float(srtt) if srtt and initialized else None

    # -- events
    def quic_event_received(self, event: events.QuicEvent) -> None:
        self._progress.set()
        try:
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                self._on_stream_reset(event.stream_id)
            elif isinstance(event, events.StopSendingReceived):
                # The peer will read no more: stop sending, but keep reading what it sends.
                writer = self._writers.get(event.stream_id)
                if writer is not None:
                    writer.abort_send()
            elif isinstance(event, events.HandshakeCompleted):
                if self.dialer:
                    self.start_handshake()
            elif isinstance(event, events.ConnectionTerminated):
                self._on_terminated(event.reason_phrase or f"error {event.error_code}")
        except (ProtocolError, AuthFailed) as exc:
            self.fail(ERR_AUTH if isinstance(exc, AuthFailed) else ERR_PROTOCOL, str(exc))

    def _on_terminated(self, reason: str) -> None:
        if self.terminated:
            return
        self.terminated = True
        for reader in self._readers.values():
            reader.feed_eof()
        self._readers.clear()
        self._writers.clear()
        if not self.authenticated.done():
            self.authenticated.set_exception(ConnectionError(f"connection closed: {reason}"))
            self.authenticated.exception()  # mark retrieved: a failed dial is reported by dial()
        self.endpoint._on_protocol_closed(self, reason)

    def _on_stream_data(self, sid: int, data: bytes, end: bool) -> None:
        if sid == CONTROL_STREAM:
            if end:
                raise ProtocolError("control stream closed by peer")
            for frame in self._control_decoder.feed(data):
                self._on_control_frame(frame)
            return
        if not self._handshake.complete:
            raise ProtocolError("data stream before authentication")
        reader = self._readers.get(sid)
        if reader is not None:
            if data:
                reader.feed_data(data)
            if end:
                reader.feed_eof()
                self._maybe_forget(sid)
            return
        dec = self._pending_first.get(sid)
        if dec is None:
            if sid & 2:
                raise ProtocolError("unidirectional streams are not used")
            if sid in self._writers or (sid & 1) == (0 if self.dialer else 1):
                # A stream we opened whose reader is gone: the data has nowhere to go.
                return
            if len(self._readers) + len(self._pending_first) >= MAX_STREAMS_PER_PEER:
                raise ProtocolError("too many concurrent streams")
            dec = self._pending_first[sid] = FrameDecoder(max_payload=MAX_FIRST_FRAME)
        frames = dec.feed(data)
        if not frames:
            if end:
                dec.close()
            return
        del self._pending_first[sid]
        first = frames[0]
        if first.type not in (MessageType.OPEN_TUNNEL, MessageType.TASK):
            raise ProtocolError(f"stream opened with {first.type.name}")
        reader = asyncio.StreamReader()
        writer = QuicStreamWriter(self, sid)
        self._readers[sid], self._writers[sid] = reader, writer
        # Frames after the first belong to the stream's own protocol: re-encode them.
        rest = b"".join(encode_frame(f) for f in frames[1:]) + dec.take_remainder()
        if rest:
            reader.feed_data(rest)
        if end:
            reader.feed_eof()
        assert self.peer is not None
        task = asyncio.ensure_future(self._run_handler(self.peer.peer_id, first, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(
        self, peer_id: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        try:
            await self.endpoint._on_stream(peer_id, first, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("stream %d from %s ended: %s", writer.stream_id, peer_id, exc)
        except Exception:
            log.exception("stream handler for %s failed", peer_id)
        finally:
            writer.close()

    def _on_stream_reset(self, sid: int) -> None:
        reader = self._readers.get(sid)
        if reader is not None:
            reader.set_exception(ConnectionResetError("stream reset by peer"))
        self._pending_first.pop(sid, None)
        self._forget(sid)

    def _on_control_frame(self, frame: Frame) -> None:
        if not self._handshake.complete:
            self._handshake.handle_frame(frame)
            self._send_handshake_frames()
            if self._handshake.complete:
                self._on_authenticated()
            return
        self.endpoint._on_control(self, frame)

    def _on_authenticated(self) -> None:
        hs = self._handshake
        assert hs.peer_id is not None and hs.peer_pubkey_der is not None
        if self.dialer:
            # The TLS certificate must carry the key that proved the node id.
            cert = getattr(self._quic.tls, "_peer_certificate", None)
            if cert is None:
                raise AuthFailed("auth failed: the peer presented no certificate")
            spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if spki != hs.peer_pubkey_der:
                raise AuthFailed("auth failed: TLS certificate does not match the node key")
        self.peer = PeerConnection(hs.peer_id, hs.peer_pubkey_der, self.remote_address, self.dialer)
        self.endpoint._on_authenticated(self)
        if not self.authenticated.done():
            self.authenticated.set_result(self.peer)

    # -- streams we open
    def open_stream(self) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        if self.terminated:
            raise ConnectionResetError("connection is closed")
        sid = self._quic.get_next_available_stream_id()
        reader = asyncio.StreamReader()
        writer = QuicStreamWriter(self, sid)
        self._readers[sid], self._writers[sid] = reader, writer
        return reader, writer

    def _maybe_forget(self, sid: int) -> None:
        reader, writer = self._readers.get(sid), self._writers.get(sid)
        if reader is not None and writer is not None and reader.at_eof() and writer._eof_sent:
            self._forget(sid)

    def _forget(self, sid: int) -> None:
        self._readers.pop(sid, None)
        self._writers.pop(sid, None)


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
        on_peer_connected: Callable[[PeerConnection], None],
        on_peer_lost: Callable[[str, str], None],
        on_control_frame: Callable[[str, Frame], None],
        on_stream: StreamHandler,
    ) -> None:
        self.identity = identity
        self.mesh = mesh
        self._host, self._port = host, port
        self._max_datagram_size = max_datagram_size
        self._idle_timeout = idle_timeout
        self._on_peer_connected = on_peer_connected
        self._on_peer_lost = on_peer_lost
        self._on_control_frame = on_control_frame
        self._on_stream_cb = on_stream
        self._server: QuicServer | None = None
        self._peers: dict[str, _MeshProtocol] = {}
        self._protocols: set[_MeshProtocol] = set()
        self._transports: dict[_MeshProtocol, asyncio.DatagramTransport] = {}
        self._closing = False

    def _config(self, is_client: bool) -> QuicConfiguration:
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self._idle_timeout,
            max_datagram_size=self._max_datagram_size,
            max_data=MAX_DATA,
            max_stream_data=MAX_STREAM_DATA,
        )
        if is_client:
            # Peers have self-signed certificates; the handshake proves who they are
            # and _on_authenticated checks the certificate carries that key.
            cfg.verify_mode = ssl.CERT_NONE
            cfg.server_name = "mesh-inference"
        else:
            cfg.certificate = self.identity.certificate
            cfg.private_key = self.identity.private_key
        return cfg

    async def start(self) -> int:
        def create_protocol(quic: QuicConnection, **kwargs: Any) -> _MeshProtocol:
            proto = _MeshProtocol(quic, self, dialer=False)
            self._protocols.add(proto)
            return proto

        self._server = await serve(
            self._host, self._port, configuration=self._config(False),
            create_protocol=create_protocol,
        )
        transport = self._server._transport
        assert transport is not None
        return int(transport.get_extra_info("sockname")[1])

    # -- callbacks from protocols
    def _on_authenticated(self, proto: _MeshProtocol) -> None:
        assert proto.peer is not None
        if proto.remote_address == "?":
            addr = proto._quic._network_paths[0].addr if proto._quic._network_paths else None
            if addr:
                proto.remote_address = f"{addr[0]}:{addr[1]}"
        peer_id = proto.peer.peer_id
        existing = self._peers.get(peer_id)
        if existing is not None and not existing.terminated:
            # Both sides dialed: keep the connection dialed by the smaller node id.
            keep_new = (self.identity.node_id < peer_id) == proto.dialer
            loser = existing if keep_new else proto
            loser.superseded = True
            if keep_new:
                self._peers[peer_id] = proto
            loser.fail(ERR_DUPLICATE, "duplicate connection")
            return
        self._peers[peer_id] = proto
        log.info("authenticated peer %s (%s, %s)", peer_id, proto.remote_address,
                 "dialed" if proto.dialer else "accepted")
        self._on_peer_connected(proto.peer)

    def _on_protocol_closed(self, proto: _MeshProtocol, reason: str) -> None:
        self._protocols.discard(proto)
        transport = self._transports.pop(proto, None)
        if transport is not None:
            transport.close()
        if proto.peer is None or proto.superseded:
            return
        if self._peers.get(proto.peer.peer_id) is proto:
            del self._peers[proto.peer.peer_id]
            if not self._closing:
                self._on_peer_lost(proto.peer.peer_id, reason)

    def _on_control(self, proto: _MeshProtocol, frame: Frame) -> None:
        assert proto.peer is not None
        if self._peers.get(proto.peer.peer_id) is not proto:
            return
        self._on_control_frame(proto.peer.peer_id, frame)

    async def _on_stream(
        self, peer_id: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        await self._on_stream_cb(peer_id, first, reader, writer)

    # -- public API
    async def dial(self, addr: str, timeout: float = 5.0) -> str:  # noqa: ASYNC109
        host, port = parse_addr(addr)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=0)
        family, _, _, _, sockaddr = infos[0]
        quic = QuicConnection(configuration=self._config(True))
        proto_holder: list[_MeshProtocol] = []

        def factory() -> _MeshProtocol:
            proto = _MeshProtocol(quic, self, dialer=True)
            proto_holder.append(proto)
            return proto

        transport, _ = await loop.create_datagram_endpoint(
            factory, local_addr=("0.0.0.0" if family == socket.AF_INET else "::", 0), family=family
        )
        proto = proto_holder[0]
        proto.remote_address = addr
        self._protocols.add(proto)
        self._transports[proto] = transport
        proto.connect(sockaddr[:2] if family == socket.AF_INET else sockaddr)
        try:
            peer = await asyncio.wait_for(asyncio.shield(proto.authenticated), timeout)
        except (TimeoutError, ConnectionError, AuthFailed) as exc:
            proto.fail(ERR_AUTH, f"dial failed: {exc}")
            await asyncio.sleep(0)
            if proto in self._transports:
                self._transports.pop(proto).close()
            self._protocols.discard(proto)
            raise ConnectionError(f"dial {addr}: {exc or 'timed out'}") from None
        return peer.peer_id

    def send_control(self, peer_id: str, type: MessageType, payload: bytes) -> None:
        proto = self._peers.get(peer_id)
        if proto is None or proto.terminated:
            raise KeyError(peer_id)
        proto.send_control(type, payload)

    async def open_stream_raw(
        self, peer_id: str
    ) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        proto = self._peers.get(peer_id)
        if proto is None or proto.terminated:
            raise KeyError(peer_id)
        return proto.open_stream()

    async def open_stream(
        self, peer_id: str, first_type: MessageType, first_payload: bytes
    ) -> tuple[asyncio.StreamReader, QuicStreamWriter]:
        reader, writer = await self.open_stream_raw(peer_id)
        writer.write(encode_frame(Frame(first_type, 0, _now_us(), first_payload)))
        return reader, writer

    def disconnect(self, peer_id: str, reason: str) -> None:
        proto = self._peers.get(peer_id)
        if proto is not None:
            proto.fail(ERR_PROTOCOL, reason)

    def peers(self) -> list[str]:
        return [pid for pid, p in self._peers.items() if not p.terminated]

    def peer_connection(self, peer_id: str) -> PeerConnection | None:
        proto = self._peers.get(peer_id)
        return proto.peer if proto is not None else None

    def rtt(self, peer_id: str) -> float | None:
        proto = self._peers.get(peer_id)
        return proto.rtt() if proto is not None else None

    async def close(self) -> None:
        self._closing = True
        for proto in list(self._protocols):
            proto.close(reason_phrase="shutting down")
        await asyncio.sleep(0.02)  # let the CONNECTION_CLOSE datagrams leave
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
