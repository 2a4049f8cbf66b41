"""DCF framing: the control-plane wire format, sans-I/O.

A frame is a 17-byte header -- u8 type, u32 BE sequence, u64 BE timestamp
(µs), u32 BE payload length -- followed by the payload. The codec knows
nothing about sockets or clocks: callers pass the timestamp in and feed
received bytes to :class:`FrameDecoder`.

Every malformed input (unknown type, oversized length) raises
:class:`ProtocolError`; the caller drops the peer that sent it. A truncated
frame is not an error while the stream is open -- the decoder waits for the
rest -- but :meth:`FrameDecoder.close` raises if a stream ends mid-frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct(">BIQI")
HEADER_SIZE = HEADER.size  # 17
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

# Control frames are small JSON documents; HTTP bodies are chunked into
# frames no larger than this. 1 MiB keeps a hostile peer from making us
# buffer much before we can refuse it.
DEFAULT_MAX_PAYLOAD = 1 << 20


class MessageType(IntEnum):
    """Frame types. 0x01-0x03 keep their DCF meanings; the rest are ours.

    DESIGN.md has the table with each payload's schema.
    """

    HEARTBEAT = 0x01  # liveness, sent on the control stream
    TASK = 0x02  # a request for the host (proxied HTTP request head + body)
    RESULT = 0x03  # the answer to a TASK (response head, then BODY frames)
    HELLO = 0x10  # auth step 1: identity + nonce (both directions)
    PROOF = 0x11  # auth step 2: HMAC over the transcript with the mesh secret + signature
    WELCOME = 0x12  # auth step 3: acceptor confirms; control stream is now open
    GOSSIP = 0x13  # membership records (node info, incarnation, status)
    GOODBYE = 0x14  # graceful leave
    OPEN_TUNNEL = 0x15  # first frame of a tunnel stream: which local service
    BODY = 0x16  # a chunk of an HTTP body following a TASK or RESULT
    ERROR = 0x17  # a peer-visible error (reason text), then close
    CREDIT = 0x18  # stream credit: the receiver consumed bytes, the sender may send more
    FETCH_MODEL = 0x19  # first frame of a model-file stream: which file (sha256), from where
    MODEL_FILE = 0x1A  # the holder's answer on that stream: the file's size, then raw bytes


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid DCF stream."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: MessageType
    seq: int
    timestamp_us: int
    payload: bytes = b""


def encode_frame(frame: Frame, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    if not 0 <= frame.seq <= U32_MAX:
        raise ValueError(f"sequence {frame.seq} does not fit in u32")
    if not 0 <= frame.timestamp_us <= U64_MAX:
        raise ValueError(f"timestamp {frame.timestamp_us} does not fit in u64")
    if len(frame.payload) > max_payload:
        raise ValueError(f"payload of {len(frame.payload)} B exceeds {max_payload} B")
    return (
        HEADER.pack(int(frame.type), frame.seq, frame.timestamp_us, len(frame.payload))
        + frame.payload
    )


class FrameEncoder:
    """Assigns consecutive sequence numbers to outgoing frames of one stream."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._seq = 0
        self._max_payload = max_payload

    def encode(self, type: MessageType, payload: bytes, now_us: int) -> bytes:
        frame = Frame(type, self._seq, now_us, payload)
        self._seq = (self._seq + 1) & U32_MAX
        return encode_frame(frame, self._max_payload)


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole frames.

    Sequence numbers start at 0 and increase by one per frame (mod 2**32):
    a gap or repeat on a reliable stream means a buggy or hostile peer.
    """

    def __init__(
        self,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        check_sequence: bool = True,
        first_seq: int = 0,
    ) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._check_sequence = check_sequence
        self._expected_seq = first_seq
        self._failed = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        """Change the limit for frames not yet returned (e.g. raise it after authentication)."""
        self._max_payload = value

    def feed(self, data: bytes) -> list[Frame]:
        """Buffer ``data`` and return every whole frame now available."""
        self.push(data)
        frames: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            frames.append(frame)
        return frames

    def push(self, data: bytes) -> None:
        """Buffer ``data`` without decoding; take frames one by one with :meth:`next_frame`."""
        if self._failed:
            raise ProtocolError("decoder already failed")
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive.

        One frame at a time lets the caller change ``max_payload`` between frames:
        the frame that completes a handshake may share a packet with bigger ones.
        """
        if self._failed:
            raise ProtocolError("decoder already failed")
        if len(self._buf) < HEADER_SIZE:
            return None
        try:
            type_, seq, ts, length = HEADER.unpack_from(self._buf)
            try:
                mtype = MessageType(type_)
            except ValueError:
                raise ProtocolError(f"unknown frame type 0x{type_:02x}") from None
            if length > self._max_payload:
                # Checked on the header alone: never wait for (or buffer) a hostile size.
                raise ProtocolError(
                    f"frame payload of {length} B exceeds limit of {self._max_payload} B"
                )
            if self._check_sequence and seq != self._expected_seq:
                raise ProtocolError(f"frame sequence {seq}, expected {self._expected_seq}")
        except ProtocolError:
            self._failed = True
            raise
        if len(self._buf) < HEADER_SIZE + length:
            return None
        payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
        del self._buf[: HEADER_SIZE + length]
        self._expected_seq = (seq + 1) & U32_MAX
        return Frame(mtype, seq, ts, payload)

    def take_remainder(self) -> bytes:
        """Bytes after the last whole frame (a tunnel stream switches to raw bytes)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def close(self) -> None:
        """The stream ended: bytes left over are a truncated frame."""
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            raise ProtocolError(f"stream ended inside a frame ({n} B left over)")
