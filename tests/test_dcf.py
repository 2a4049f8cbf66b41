"""DCF frame codec: round trips under any chunking, and every way a stream can be bad."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_inference.core.dcf import (
    HEADER,
    HEADER_SIZE,
    U32_MAX,
    U64_MAX,
    Frame,
    FrameDecoder,
    FrameEncoder,
    MessageType,
    ProtocolError,
    encode_frame,
)

frame_specs = st.lists(
    st.tuples(
        st.sampled_from(list(MessageType)),
        st.integers(0, U64_MAX),
        st.binary(max_size=300),
    ),
    max_size=12,
)


def encode_all(specs: list[tuple[MessageType, int, bytes]]) -> tuple[list[Frame], bytes]:
    enc = FrameEncoder()
    frames = [Frame(t, seq, ts, p) for seq, (t, ts, p) in enumerate(specs)]
    return frames, b"".join(enc.encode(t, p, ts) for t, ts, p in specs)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@given(frame_specs, st.lists(st.integers(0, 4000), max_size=20))
def test_any_chunking_decodes_the_same_frames(
    specs: list[tuple[MessageType, int, bytes]], cuts: list[int]
) -> None:
    frames, data = encode_all(specs)
    dec = FrameDecoder()
    got: list[Frame] = []
    for chunk in chunked(data, cuts):
        got += dec.feed(chunk)
    assert got == frames
    assert dec.buffered == 0
    dec.close()  # a clean end


@given(frame_specs.filter(lambda s: len(s) > 0), st.data())
def test_byte_at_a_time_and_truncation(
    specs: list[tuple[MessageType, int, bytes]], data: st.DataObject
) -> None:
    frames, stream = encode_all(specs)
    # cut into the last frame, leaving at least its first byte
    last_len = HEADER_SIZE + len(specs[-1][2])
    cut = data.draw(st.integers(1, last_len - 1), label="bytes cut off")
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(stream) - cut):
        got += dec.feed(stream[i : i + 1])
    assert got == frames[:-1]  # a partial frame is not an error while the stream is open
    with pytest.raises(ProtocolError, match="ended inside a frame"):
        dec.close()


def header(type_: int, seq: int, length: int, ts: int = 0) -> bytes:
    return HEADER.pack(type_, seq, ts, length)


def test_header_layout() -> None:
    data = encode_frame(Frame(MessageType.GOSSIP, 7, 0x0102030405060708, b"xy"))
    assert HEADER_SIZE == 17
    assert data == bytes([0x13]) + struct.pack(">I", 7) + bytes(range(1, 9)) + struct.pack(
        ">I", 2) + b"xy"


def test_oversized_payload_is_refused_from_the_header_alone() -> None:
    dec = FrameDecoder(max_payload=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(header(MessageType.BODY, 0, 1025))  # no payload bytes needed to refuse
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(header(MessageType.BODY, 0, U32_MAX))
    assert FrameDecoder(max_payload=1024).feed(header(MessageType.BODY, 0, 1024) + bytes(1024))


@pytest.mark.parametrize("type_", [0x00, 0x04, 0x0F, 0x1B, 0x99, 0xFF])
def test_unknown_type_is_refused(type_: int) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder().feed(header(type_, 0, 0))


def test_sequence_gap_and_repeat_are_refused() -> None:
    first = encode_frame(Frame(MessageType.HEARTBEAT, 0, 0, b"{}"))
    for bad_seq in (2, 0, U32_MAX):
        dec = FrameDecoder()
        assert len(dec.feed(first)) == 1
        with pytest.raises(ProtocolError, match="sequence"):
            dec.feed(encode_frame(Frame(MessageType.HEARTBEAT, bad_seq, 0, b"{}")))


def test_sequence_wraps_around() -> None:
    dec = FrameDecoder(first_seq=U32_MAX)
    data = encode_frame(Frame(MessageType.BODY, U32_MAX, 0, b"a")) + encode_frame(
        Frame(MessageType.BODY, 0, 0, b"b")
    )
    assert [f.payload for f in dec.feed(data)] == [b"a", b"b"]


def test_first_frame_must_have_sequence_zero() -> None:
    with pytest.raises(ProtocolError, match="sequence 1, expected 0"):
        FrameDecoder().feed(encode_frame(Frame(MessageType.BODY, 1, 0, b"")))


def test_sequence_check_can_be_disabled() -> None:
    dec = FrameDecoder(check_sequence=False)
    data = b"".join(encode_frame(Frame(MessageType.BODY, s, 0, b"")) for s in (5, 1, 1))
    assert [f.seq for f in dec.feed(data)] == [5, 1, 1]


def test_a_failed_decoder_stays_failed() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(header(0xEE, 0, 0))
    with pytest.raises(ProtocolError, match="already failed"):
        dec.feed(encode_frame(Frame(MessageType.HEARTBEAT, 0, 0, b"")))


def test_a_chunk_with_a_bad_frame_fails_as_a_whole() -> None:
    # The bad frame arrives with good ones in one chunk: the whole feed fails
    # and the caller drops the peer; nothing is half-delivered afterwards.
    good = encode_frame(Frame(MessageType.HEARTBEAT, 0, 0, b"{}"))
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(good + header(0xEE, 1, 0))
    with pytest.raises(ProtocolError):
        dec.feed(b"")


def test_take_remainder_hands_over_raw_bytes() -> None:
    first = encode_frame(Frame(MessageType.OPEN_TUNNEL, 0, 0, b'{"service":"rpc"}'))
    dec = FrameDecoder()
    (frame,) = dec.feed(first + b"\x00raw rpc bytes")
    assert frame.type is MessageType.OPEN_TUNNEL
    assert dec.take_remainder() == b"\x00raw rpc bytes"
    assert dec.buffered == 0
    dec.close()


def test_encoder_limits() -> None:
    with pytest.raises(ValueError):
        encode_frame(Frame(MessageType.BODY, U32_MAX + 1, 0))
    with pytest.raises(ValueError):
        encode_frame(Frame(MessageType.BODY, -1, 0))
    with pytest.raises(ValueError):
        encode_frame(Frame(MessageType.BODY, 0, U64_MAX + 1))
    with pytest.raises(ValueError):
        encode_frame(Frame(MessageType.BODY, 0, 0, bytes(11)), max_payload=10)
    enc = FrameEncoder(max_payload=10)
    with pytest.raises(ValueError):
        enc.encode(MessageType.BODY, bytes(11), 0)


def test_encoder_numbers_frames_from_zero() -> None:
    enc = FrameEncoder()
    dec = FrameDecoder()
    frames = dec.feed(b"".join(enc.encode(MessageType.BODY, b"", 0) for _ in range(3)))
    assert [f.seq for f in frames] == [0, 1, 2]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=10), st.booleans())
def test_random_bytes_raise_nothing_but_protocol_error(chunks: list[bytes], seq: bool) -> None:
    dec = FrameDecoder(max_payload=256, check_sequence=seq)
    try:
        for chunk in chunks:
            for frame in dec.feed(chunk):
                assert isinstance(frame.type, MessageType)
                assert len(frame.payload) <= 256
        dec.close()
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(frame_specs, st.binary(min_size=1, max_size=40), st.integers(0, 10_000))
def test_garbage_after_valid_frames(
    specs: list[tuple[MessageType, int, bytes]], garbage: bytes, at: int
) -> None:
    _, data = encode_all(specs)
    pos = min(at, len(data))
    dec = FrameDecoder()
    try:
        got = dec.feed(data[:pos] + garbage + data[pos:])
        dec.close()
    except ProtocolError:
        return
    # Whatever decoded without error is well-formed.
    assert all(isinstance(f.type, MessageType) for f in got)
