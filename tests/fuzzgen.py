"""Structured fuzzing of what a peer or an HTTP client can make this program parse.

Shared by ``scripts/fuzz.py`` (100,000 inputs per target) and ``tests/test_fuzz.py``
(a few thousand, fixed seed). Input ``i`` of a target is generated from
``random.Random(f"{target}:{seed}:{i}")`` alone, so any one of them can be
replayed (``scripts/fuzz.py --target T --seed S --only I``).

Each target turns such a generator into one input, runs it through the real
code and reports ``"accepted"`` or ``"refused"`` (refused with the API's
declared error). Anything else is a **crash**: another exception, a broken
invariant (below), an HTTP 5xx, an error body that is not OpenAI-style JSON,
a hang, or a record logged at ERROR while the input ran.

Targets and their declared refusals:

``dcf``
    ``core.dcf.FrameDecoder`` (``ProtocolError``): streams of valid frames,
    mutated (bit flips, truncation, extension, lies in the type / sequence /
    length fields, garbage before or after), fed in random splits through
    ``feed`` or ``push``/``next_frame``, the payload limit sometimes raised
    between frames. Invariants: the same frames and the same verdict for any
    split; frames re-encode to exactly the bytes they came from; ``close``
    refuses exactly when a frame is cut. Payloads of message frames go on
    through ``decode_payload``.
``messages``
    ``core.messages.decode_payload`` (``ProtocolError``): every message type,
    valid then mutated as JSON trees (wrong types, NaN/Infinity, huge and
    bordering numbers, deep nesting, duplicate and unknown keys, unicode edge
    cases, strings and lists at their limits ± 1) and as bytes; also payloads
    of one type sent as another. Invariants: a valid payload is accepted;
    whatever is accepted survives ``encode_payload`` (a node re-gossips what
    it accepted).
``rpc``
    ``core.rpc.HostRewriter`` / ``WorkerExpander`` (``RpcError``; a raising
    transform tears down its tunnel, ``net/tunnel.py``): llama.cpp RPC command
    streams with weight-sized SET_TENSORs (matching the file or not),
    SET_TENSOR_HASH, unknown commands and weight references, mutated (size
    lies, offsets, digests) and split at random; reply streams too.
    Invariants: the host's output, expanded by a worker holding the same file,
    is byte for byte the input minus the SET_TENSOR_HASHes the host answered
    itself (a prefix of it while a command is cut); the worker's output and
    verdict do not depend on the split.
``http``
    ``api.openai``: ``validate_body``/``check_model`` for most inputs,
    ``serve_openai`` with an in-process engine (which sometimes breaks a
    stream half-way, so the continuation runs on the fuzzed request) for
    some, and the real gateway app (``create_app``) over loopback, in front of
    a llama-server stand-in, for a few. Refusals are 4xx with an OpenAI-style
    JSON error; valid bodies must be accepted.
``session``
    ``core.session.PeerSession`` (a peer it drops with a reason): random and
    mutated datagrams into new and established sessions (through
    ``quicstack.parse_destination``, as the endpoint routes them), mutated
    handshake frames (Hello/Proof/Welcome) from a peer that otherwise follows
    the protocol, and garbage control frames and streams from an
    authenticated peer (whose control frames are decoded as the membership
    driver does). Nothing may raise out of the session, and a dropped peer is
    dropped for a protocol or authentication reason, never an internal error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import heapq
import itertools
import json
import logging
import math
import random
import struct
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web

from mesh_inference.api import openai
from mesh_inference.api.gateway import NoHostError, create_app
from mesh_inference.core import rpc
from mesh_inference.core.dcf import (
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    U32_MAX,
    Frame,
    FrameDecoder,
    FrameEncoder,
    MessageType,
    ProtocolError,
    encode_frame,
)
from mesh_inference.core.handshake import MAX_HANDSHAKE_PAYLOAD
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.core.messages import (
    HTTP_METHODS,
    MAX_INCARNATION,
    MAX_STREAM_ID,
    Credit,
    ErrorMessage,
    FetchModel,
    Goodbye,
    Gossip,
    Heartbeat,
    MemberRecord,
    Message,
    ModelFile,
    NodeInfo,
    OpenTunnel,
    ResultHead,
    TaskHead,
    decode_payload,
    encode_payload,
)
from mesh_inference.core.quicstack import STACK, QuicConnection, parse_destination
from mesh_inference.core.session import (
    CID_LENGTH,
    ERR_INTERNAL,
    ERR_PROTOCOL,
    ControlFrameReceived,
    PeerSession,
    SessionClosed,
    StreamDataReceived,
    StreamOpened,
    quic_configuration,
)
from mesh_inference.engine.weights import NO_FILE
from mesh_inference.net.proxy import ProxiedResponse

TARGETS = ("dcf", "messages", "rpc", "http", "session")

ACCEPTED = "accepted"
REFUSED = "refused"


class Crash(Exception):
    """An input broke an invariant (raised by the checks here)."""


# ============================================================================ running
@dataclass
class Tally:
    target: str
    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    crashes: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few crash reports
    modes: dict[str, dict[str, int]] = field(default_factory=dict)  # mode -> outcome -> n
    notes: dict[str, int] = field(default_factory=dict)  # refusals worth a mention

    def line(self) -> str:
        return (f"{self.target:<9} inputs {self.inputs:>7}  accepted {self.accepted:>7}  "
                f"refused {self.refused:>7}  crashes {self.crashes:>3}  {self.seconds:7.1f} s")


class ErrorTrap(logging.Handler):
    """Collects records at ERROR and above (a logged internal error is a crash)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def trap_errors() -> Any:
    """Route log records to an :class:`ErrorTrap` (and nowhere else) while fuzzing."""
    root = logging.getLogger()
    trap = ErrorTrap()
    root.addHandler(trap)
    try:
        yield trap
    finally:
        root.removeHandler(trap)


def input_rng(target: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{target}:{seed}:{index}")


def make_target(name: str) -> Any:
    return {"dcf": DcfTarget, "messages": MessagesTarget, "rpc": RpcTarget,
            "http": HttpTarget, "session": SessionTarget}[name]()


def run_target(
    name: str,
    count: int,
    seed: int,
    *,
    start: int = 0,
    keep: int = 5,
    progress: Callable[[Tally], None] | None = None,
) -> Tally:
    """Run inputs ``start .. start + count - 1`` of target ``name``."""
    tally = Tally(name)
    target = make_target(name)
    began = time.perf_counter()
    with trap_errors() as trap:
        target.setup()
        try:
            for i in range(start, start + count):
                rng = input_rng(name, seed, i)
                target.last = "?"
                target.mode = name
                trap.records.clear()
                tally.inputs += 1
                try:
                    outcome = target.run_one(rng)
                    if trap.records:
                        rec = trap.records[0]
                        raise Crash(f"logged {rec.levelname} {rec.name}: {rec.getMessage()}"
                                    + (f"\n{_exc_text(rec)}" if rec.exc_info else ""))
                except Exception as exc:
                    tally.crashes += 1
                    if len(tally.failures) < keep:
                        trace = "".join(line[:400] for line in traceback.format_exception(exc)[-6:])
                        tally.failures.append(
                            f"{name} seed {seed} input {i}: {_short(exc, 1000)}\n"
                            f"  input: {target.last}\n{trace}"
                        )
                    target.reset()
                    continue
                per_mode = tally.modes.setdefault(target.mode, {ACCEPTED: 0, REFUSED: 0})
                per_mode[outcome] = per_mode.get(outcome, 0) + 1
                if outcome == ACCEPTED:
                    tally.accepted += 1
                elif outcome == REFUSED:
                    tally.refused += 1
                else:  # pragma: no cover - a bug in a target
                    raise AssertionError(f"bad outcome {outcome!r}")
                if progress is not None and tally.inputs % 1000 == 0:
                    tally.seconds = time.perf_counter() - began
                    progress(tally)
        finally:
            target.close()
    tally.notes = dict(target.notes)
    tally.seconds = time.perf_counter() - began
    return tally


def _exc_text(record: logging.LogRecord) -> str:
    assert record.exc_info is not None and record.exc_info[1] is not None
    return "".join(traceback.format_exception(record.exc_info[1])[-4:])


class Target:
    name = ""
    last = "?"  # what the current input is, for crash reports
    mode = ""  # which generator made it (counted per mode)

    def __init__(self) -> None:
        self.notes: dict[str, int] = {}

    def note(self, what: str) -> None:
        self.notes[what] = self.notes.get(what, 0) + 1

    def setup(self) -> None:
        pass

    def reset(self) -> None:
        """After a crash: drop state the crash may have left broken."""

    def close(self) -> None:
        pass

    def run_one(self, rng: random.Random) -> str:
        raise NotImplementedError


def _short(data: object, limit: int = 300) -> str:
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# ============================================================================ bytes
INT_EDGES = (0, 1, 2, 7, 8, 255, 256, 4095, 4096, 4097, 65535, 65536, (1 << 20) - 1, 1 << 20,
             (1 << 20) + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**53 + 1, 2**62 - 1,
             2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -(2**63))


def random_bytes(rng: random.Random, limit: int = 200) -> bytes:
    n = rng.choice((0, 1, 2, 8, 17, rng.randrange(limit + 1), rng.randrange(limit + 1)))
    if rng.random() < 0.2:
        return bytes([rng.choice((0, 0xFF, 0x7F, 0x80))]) * n
    return rng.randbytes(n)


@dataclass(frozen=True)
class Field:
    """An integer field inside a generated input: where a mutation may lie."""

    offset: int
    width: int
    order: Literal["big", "little"] = "big"


def _lie(rng: random.Random, current: int, width: int) -> int:
    top = (1 << (8 * width)) - 1
    value = rng.choice((0, 1, current - 1, current + 1, current * 2, current + 4096, top,
                        top - 1, top >> 1, rng.choice(INT_EDGES), rng.getrandbits(8 * width)))
    return value & top


def mutate_bytes(rng: random.Random, data: bytes, fields: Sequence[Field] = ()) -> bytes:
    """One to a few random byte-level mutations (fields: integer fields worth lying in)."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5))):
        op = rng.randrange(10)
        n = len(b)
        if op in (0, 1) and fields and rng.random() < 0.8:
            f = rng.choice(fields)
            if f.offset + f.width <= n:
                cur = int.from_bytes(b[f.offset : f.offset + f.width], f.order)
                b[f.offset : f.offset + f.width] = _lie(rng, cur, f.width).to_bytes(
                    f.width, f.order)
                continue
        if op <= 2 and n:  # bit flips
            for _ in range(rng.choice((1, 1, 2, 8))):
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
        elif op == 3 and n:  # an interesting byte
            b[rng.randrange(n)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x22, 0x5C, 0x7B, 0x5B))
        elif op == 4:  # truncation
            del b[rng.randrange(n + 1):]
        elif op == 5:  # extension
            b += random_bytes(rng, 64)
        elif op == 6:  # insertion
            i = rng.randrange(n + 1)
            b[i:i] = random_bytes(rng, 32)
        elif op == 7 and n:  # deletion
            i = rng.randrange(n)
            del b[i : i + rng.randint(1, 16)]
        elif op == 8 and n:  # repeat a slice
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 64))
            b[j:j] = b[i:j] * rng.randint(1, 4)
        elif n:  # swap two slices' contents via a random overwrite
            i = rng.randrange(n)
            chunk = rng.randbytes(rng.randint(1, 8))
            b[i : i + len(chunk)] = chunk
    return bytes(b)


def split(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut into chunks (possibly empty ones) at random places."""
    n = len(data)
    r = rng.random()
    if n == 0 or r < 0.25:
        return [data]
    if r < 0.35 and n <= 600:
        return [data[i : i + 1] for i in range(n)]
    cuts = sorted(rng.randrange(n + 1) for _ in range(rng.randint(1, min(12, n))))
    parts, prev = [], 0
    for c in cuts:
        parts.append(data[prev:c])
        prev = c
    parts.append(data[prev:])
    return parts


# ============================================================================ JSON
@dataclass(frozen=True)
class Raw:
    """JSON text inserted verbatim (NaN, numbers json.dumps would not write, nesting)."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """A JSON object written from pairs: duplicate keys, keys that are not strings."""

    items: tuple[tuple[object, object], ...]


NUMBER_TEXTS = (
    "NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "0.0", "-0.0",
    "1.0", "1E2", "0e0", "1.5", "1" + "0" * 4299, "1" + "0" * 4300, "-" + "9" * 5000,
    "123456789012345678901234567890", "1.7976931348623157e308", "4.9e-324", "9223372036854775807",
    "9223372036854775808", "18446744073709551615", "18446744073709551616", "4611686018427387903",
    "4611686018427387904", "1099511627776", "1099511627777", "1152921504606846976",
    "01", "+1", ".5", "1.", "0x10", "1e", "--1", "1_000",
)
UNICODE_EDGES = (
    "", " ", "\x00", "\x01", "\t", "\n", "\r\n", "\x1f", "\x7f", "\x80", "\x85", "\x9f", "\xa0",
    "\u2028", "\u2029", "\ufeff", "\ufffe", "\uffff", "\u202e", "\u200b", "\U0001f600",
    "e\u0301", "\ud800", "\udfff", "\udc00\ud800", "\U0010ffff", "a\x00b", "ı", "ß", "Ω",
    "机器", "\\", '"', "/", "//", "#", "?", "%00", "..", "../../etc/passwd", "<script>",
    "x" * 16, "x" * 17, "f" * 64, "F" * 64, "0" * 65,
)
LONG_LENGTHS = (15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 1023, 1024, 1025, 8191, 8192,
                8193, 100_000)


def deep_text(rng: random.Random) -> Raw:
    depth = rng.choice((2, 16, 63, 64, 65, 66, 100, 500, rng.randint(880, 1020), 3000, 50_000))
    style = rng.randrange(4)
    if style == 0:
        text = "[" * depth + "0" + "]" * depth
    elif style == 1:
        text = '{"a":' * depth + "0" + "}" * depth
    elif style == 2:
        text = '[{"a":' * (depth // 2) + "0" + "}]" * (depth // 2)
    else:
        text = "[" * depth  # never closed
    return Raw(text)


def unicode_string(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return rng.choice(UNICODE_EDGES)
    if r < 0.7:
        return rng.choice("xé机😀\x00\ud800 ") * rng.choice(LONG_LENGTHS)
    if r < 0.9:
        return "".join(chr(rng.choice((rng.randrange(0x80), rng.randrange(0x800),
                                       rng.randrange(0x110000))))
                       for _ in range(rng.randrange(12)))
    return rng.choice(UNICODE_EDGES) + "x" + rng.choice(UNICODE_EDGES)


def weird_value(rng: random.Random) -> object:
    r = rng.randrange(16)
    if r == 0:
        return None
    if r == 1:
        return rng.choice((True, False))
    if r == 2:
        return rng.choice(INT_EDGES)
    if r == 3:
        return rng.choice((0.0, -0.0, 1.5, 1e308, float("nan"), float("inf"), -float("inf")))
    if r in (4, 5):
        return Raw(rng.choice(NUMBER_TEXTS))
    if r in (6, 7):
        return unicode_string(rng)
    if r == 8:
        return []
    if r == 9:
        return {}
    if r == 10:
        return [weird_value(rng) for _ in range(rng.randrange(3))]
    if r == 11:
        return {unicode_string(rng): weird_value(rng)}
    if r == 12:
        return deep_text(rng)
    if r == 13:
        return Raw(rng.choice(("", "nul", "tru", "[", "{", "]", '"', "'x'", "undefined", "[,]",
                               '{"a"}', "[1,]", '{"a":1,}', "/*c*/1", "\x00")))
    if r == 14:
        return rng.randrange(-1000, 1000)
    return "x" * rng.choice(LONG_LENGTHS)


def dumps(value: object, ascii_only: bool = False) -> str:
    """JSON text of ``value``, with :class:`Raw` and :class:`Pairs` written as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ",".join(
            f"{k.text if isinstance(k, Raw) else dumps(str(k), ascii_only)}:{dumps(v, ascii_only)}"
            for k, v in value.items
        ) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(
            f"{dumps(str(k), ascii_only)}:{dumps(v, ascii_only)}" for k, v in value.items()
        ) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v, ascii_only) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)
    return json.dumps(value)  # None, bool, int, float (NaN/Infinity as JS writes them)


def to_bytes(rng: random.Random, text: str) -> bytes:
    r = rng.random()
    if r < 0.03:
        return text.encode("utf-16", "surrogatepass")
    if r < 0.05:
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass")  # a BOM
    if r < 0.07:
        return (" \n\t" * rng.randint(1, 3) + text + " \r\n").encode("utf-8", "surrogatepass")
    # Lone surrogates (written raw when not escaped) become invalid UTF-8 here.
    return text.encode("utf-8", "surrogatepass")


def _nodes(value: object) -> list[tuple[object, object]]:
    """Every (container, key) in a JSON tree, root as (None, None); Pairs are leaves."""
    out: list[tuple[object, object]] = [(None, None)]
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                out.append((item, k))
                stack.append(v)
        elif isinstance(item, list):
            for i, v in enumerate(item):
                out.append((item, i))
                stack.append(v)
    return out


def _mutate_node(rng: random.Random, node: object) -> object:
    """A replacement for ``node``."""
    r = rng.random()
    if r < 0.35:
        return weird_value(rng)
    if isinstance(node, dict) and node:
        keys = list(node)
        op = rng.randrange(5)
        new = dict(node)
        if op == 0:
            del new[rng.choice(keys)]
        elif op == 1:
            new[unicode_string(rng) or "extra"] = weird_value(rng)
        elif op == 2:  # a duplicate key: the second value differs
            k = rng.choice(keys)
            return Pairs((*new.items(), (k, weird_value(rng))))
        elif op == 3:  # a key that differs by case or whitespace
            k = rng.choice(keys)
            new[rng.choice((k.upper(), k + " ", " " + k, k + "\x00"))] = new.pop(k)
        else:
            return Pairs(tuple((Raw(str(rng.randrange(9))) if rng.random() < 0.5 else k, v)
                               for k, v in new.items()))
        return new
    if isinstance(node, list):
        op = rng.randrange(5)
        if op == 0 or not node:
            return [*node, weird_value(rng)]
        if op == 1:
            return []
        if op == 2:
            return node * rng.choice((2, 17, 65, 257, 1000))
        if op == 3:
            return [*node, node[0]]
        return node[1:]
    if isinstance(node, bool):
        return rng.choice((not node, 0 if node else 1, str(node).lower(), None))
    if isinstance(node, int):
        return rng.choice((node + 1, node - 1, -node - 1, node * 2**32, rng.choice(INT_EDGES),
                           float(node), Raw(str(node) + ".0"), Raw(str(node) + "e0"),
                           str(node), Raw(rng.choice(NUMBER_TEXTS))))
    if isinstance(node, float):
        return rng.choice((float("nan"), float("inf"), -node, Raw("1e999"),
                           int(node) if math.isfinite(node) else 0))
    if isinstance(node, str):
        op = rng.randrange(6)
        if op == 0:
            return unicode_string(rng)
        if op == 1:
            return node + unicode_string(rng)
        if op == 2:
            return (node or "x") * rng.choice(LONG_LENGTHS) if len(node) < 200 else node * 2
        if op == 3:
            return node.upper()
        if op == 4 and node:
            i = rng.randrange(len(node))
            return node[:i] + rng.choice(("\x00", "\n", "\r", "\ud800", " ", "\u2028")) + node[i:]
        return node[: rng.randrange(len(node) + 1)]
    return weird_value(rng)


def mutate_tree(rng: random.Random, value: object) -> object:
    """``value`` (a JSON tree) with one to three nodes replaced."""
    value = copy.deepcopy(value)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        nodes = _nodes(value)
        parent, key = rng.choice(nodes)
        if parent is None:
            value = _mutate_node(rng, value)
        else:
            container: Any = parent
            container[key] = _mutate_node(rng, container[key])
    return value


def mutated_json(rng: random.Random, tree: object) -> bytes:
    """A JSON document from ``tree``: mutated as a tree, as bytes, or both."""
    r = rng.random()
    text_tree = mutate_tree(rng, tree) if r < 0.85 else tree
    data = to_bytes(rng, dumps(text_tree, ascii_only=rng.random() < 0.3))
    if r > 0.6:
        data = mutate_bytes(rng, data)
    return data


# ============================================================================ messages
NAMES = ("alice", "node-1", "Ünïcødé", "机器", "x", "a" * 64, "laptop.local", "e\u0301")
ADDRS = ("10.0.0.1:4433", "192.168.1.20:9000", "[::1]:4433", "[fe80::1]:1",
         "host.example:80", "a.b.c:65535", "localhost:1")


def valid_node_info(rng: random.Random) -> NodeInfo:
    return NodeInfo(
        node_id=rng.randbytes(8).hex(),
        name=rng.choice(NAMES),
        role=rng.choice(("member", "client")),
        memory_bytes=rng.choice((0, 1, 8 << 30, 1 << 60)),
        addrs=tuple(rng.sample(ADDRS, rng.randint(0, 3))),
        http_port=rng.choice((0, 9337, 65535)),
        model=rng.choice((None, "smollm2-135m", "hf://owner/repo/file.gguf", "/models/ü.gguf")),
        has_model=rng.random() < 0.5,
        version=rng.choice(("0.1.0", "1.2.3-dev+x")),
        model_bytes=rng.choice((0, 1 << 30)),
        rpc_ready=rng.random() < 0.5,
        engine_state=rng.choice(("stopped", "ready", "starting", "crash-loop")),
        model_epoch=rng.choice((0, 1, MAX_INCARNATION)),
        model_sha256=rng.choice((None, rng.randbytes(32).hex())),
    )


HEADER_SAMPLES = (("content-type", "application/json"), ("accept", "text/event-stream"),
                  ("x-mesh-hops", "1"), ("x-request-id", "ab\tc"), ("cache-control", "no-cache"),
                  ("X-Custom", "ü ok"))


def valid_message(rng: random.Random, mtype: MessageType) -> Message:
    if mtype == MessageType.HEARTBEAT:
        return Heartbeat(rng.choice((0, 1, 12345, MAX_INCARNATION)))
    if mtype == MessageType.GOSSIP:
        infos = {i.node_id: i for i in (valid_node_info(rng) for _ in range(rng.randint(0, 3)))}
        return Gossip(tuple(
            MemberRecord(info, rng.choice((0, 7, MAX_INCARNATION)),
                         rng.choice(("alive", "suspect", "dead", "left")))
            for info in infos.values()
        ))
    if mtype == MessageType.GOODBYE:
        return Goodbye(rng.choice(("", "shutting down", "ü" * 1024)))
    if mtype == MessageType.ERROR:
        return ErrorMessage(rng.choice(("", "auth failed", "x" * 1024)))
    if mtype == MessageType.OPEN_TUNNEL:
        return OpenTunnel(rng.choice(("rpc", "r", "a-b_c", "z" * 32)))
    if mtype == MessageType.TASK:
        return TaskHead(rng.choice(sorted(HTTP_METHODS)),
                        rng.choice(("/", "/v1/chat/completions", "/v1/models?x=1", "/ü/%20")),
                        tuple(rng.sample(HEADER_SAMPLES, rng.randint(0, 3))))
    if mtype == MessageType.RESULT:
        return ResultHead(rng.choice((100, 200, 404, 599)),
                          tuple(rng.sample(HEADER_SAMPLES, rng.randint(0, 3))))
    if mtype == MessageType.CREDIT:
        return Credit(rng.choice((0, 4, MAX_STREAM_ID)), rng.choice((1, 512 << 10, 1 << 40)))
    if mtype == MessageType.FETCH_MODEL:
        return FetchModel(rng.randbytes(32).hex(), rng.choice((0, 1 << 30, 1 << 60)))
    if mtype == MessageType.MODEL_FILE:
        return ModelFile(rng.choice((0, 1 << 30, 1 << 60)))
    raise ValueError(f"{mtype.name} carries no message")


MESSAGE_TYPES = (MessageType.HEARTBEAT, MessageType.GOSSIP, MessageType.GOODBYE,
                 MessageType.ERROR, MessageType.OPEN_TUNNEL, MessageType.TASK, MessageType.RESULT,
                 MessageType.CREDIT, MessageType.FETCH_MODEL, MessageType.MODEL_FILE)


def valid_payload(rng: random.Random, mtype: MessageType) -> bytes:
    return encode_payload(valid_message(rng, mtype))


def check_decode_payload(mtype: MessageType, payload: bytes) -> str:
    """decode_payload's verdict; whatever it accepts must survive encode_payload."""
    try:
        msg = decode_payload(mtype, payload)
    except ProtocolError:
        return REFUSED
    try:
        again = encode_payload(msg)
    except ValueError as exc:
        raise Crash(f"accepted {type(msg).__name__} cannot be sent on: {exc}") from None
    if decode_payload(mtype, again) != msg:
        raise Crash(f"accepted {type(msg).__name__} changes on the way: {msg!r}")
    return ACCEPTED


class MessagesTarget(Target):
    name = "messages"

    def run_one(self, rng: random.Random) -> str:
        mtype = rng.choice(MESSAGE_TYPES)
        r = rng.random()
        if r < 0.03:  # frames that carry no message payload
            other = rng.choice((MessageType.HELLO, MessageType.PROOF, MessageType.WELCOME,
                                MessageType.BODY))
            payload = random_bytes(rng)
            self.last = f"{other.name} {_short(payload)}"
            with contextlib.suppress(ProtocolError):
                decode_payload(other, payload)
                raise Crash(f"{other.name} decoded as a message")
            return REFUSED
        source = rng.choice(MESSAGE_TYPES) if rng.random() < 0.1 else mtype
        valid = valid_payload(rng, source)
        if r < 0.08:
            payload = valid
        elif r < 0.15:
            payload = random_bytes(rng)
        elif r < 0.35:
            payload = mutate_bytes(rng, valid)
        else:
            payload = mutated_json(rng, json.loads(valid))
        self.last = f"{mtype.name} {_short(payload)}"
        verdict = check_decode_payload(mtype, payload)
        if payload == valid and source == mtype and verdict != ACCEPTED:
            raise Crash("a valid payload was refused")
        return verdict


# ============================================================================ dcf
def frame_stream(
    rng: random.Random, first_seq: int, max_payload: int
) -> tuple[list[Frame], bytes, list[Field]]:
    frames: list[Frame] = []
    fields: list[Field] = []
    data = bytearray()
    seq = first_seq
    for _ in range(rng.choice((0, 1, 1, 2, 3, 5))):
        mtype = rng.choice(list(MessageType))
        r = rng.random()
        if mtype in MESSAGE_TYPES and r < 0.5:
            payload = valid_payload(rng, mtype)
        elif r < 0.6 and max_payload <= MAX_HANDSHAKE_PAYLOAD:
            payload = bytes(max(0, max_payload + rng.choice((-1, 0))))
        elif r < 0.62:
            payload = bytes(min(max_payload, DEFAULT_MAX_PAYLOAD))
        else:
            payload = random_bytes(rng, 100)
        payload = payload[:max_payload]
        frame = Frame(mtype, seq, rng.choice((0, 1, rng.getrandbits(64), 2**64 - 1)), payload)
        off = len(data)
        fields += [Field(off, 1), Field(off + 1, 4), Field(off + 5, 8), Field(off + 13, 4)]
        data += encode_frame(frame, max_payload)
        frames.append(frame)
        seq = (seq + 1) & U32_MAX
    return frames, bytes(data), fields


@dataclass
class _Decoded:
    frames: list[Frame]
    error: ProtocolError | None
    rest: bytes


def _decode(chunks: Iterable[bytes], *, max_payload: int, check: bool, first: int,
            raise_to: int | None, one_by_one: bool) -> _Decoded:
    dec = FrameDecoder(max_payload=max_payload, check_sequence=check, first_seq=first)
    frames: list[Frame] = []
    try:
        for chunk in chunks:
            if one_by_one or raise_to is not None:
                dec.push(chunk)
                while (frame := dec.next_frame()) is not None:
                    frames.append(frame)
                    if raise_to is not None:
                        dec.max_payload = raise_to  # as a session does once authenticated
            else:
                frames += dec.feed(chunk)
    except ProtocolError as exc:
        with contextlib.suppress(ProtocolError):
            dec.push(b"x")
            raise Crash("a failed decoder took more bytes") from None
        with contextlib.suppress(ProtocolError):
            dec.next_frame()
            raise Crash("a failed decoder returned more frames") from None
        return _Decoded(frames, exc, b"")
    buffered = dec.buffered
    rest = dec.take_remainder()
    if len(rest) != buffered:
        raise Crash("buffered does not count the remainder")
    # close(): refuses exactly when a frame was cut.
    dec2 = FrameDecoder(max_payload=max_payload, check_sequence=check, first_seq=first)
    dec2.push(rest)
    try:
        dec2.close()
        if rest:
            raise Crash("close() accepted a cut frame")
    except ProtocolError:
        if not rest:
            raise Crash("close() refused a stream that ended between frames") from None
    return _Decoded(frames, None, rest)


class DcfTarget(Target):
    name = "dcf"

    def run_one(self, rng: random.Random) -> str:
        max_payload = rng.choice((MAX_HANDSHAKE_PAYLOAD, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD,
                                  64, 0, 1 << 16))
        first_seq = rng.choice((0, 0, 0, 1, U32_MAX, U32_MAX - 1, rng.getrandbits(32)))
        frames, valid, fields = frame_stream(rng, first_seq, max_payload)
        r = rng.random()
        if r < 0.15:
            data = valid
        elif r < 0.25:
            data = random_bytes(rng, 300)
        elif r < 0.3:
            data = random_bytes(rng, 40) + valid
        else:
            data = mutate_bytes(rng, valid, fields)
        check = rng.random() < 0.85
        first = first_seq if rng.random() < 0.9 else rng.getrandbits(32)
        raise_to = DEFAULT_MAX_PAYLOAD if rng.random() < 0.2 else None
        chunks = split(rng, data)
        self.last = (f"max_payload={max_payload} check={check} first={first} "
                     f"raise_to={raise_to} chunks={[len(c) for c in chunks][:20]} "
                     f"data={_short(data)}")
        got = _decode(chunks, max_payload=max_payload, check=check, first=first,
                      raise_to=raise_to, one_by_one=rng.random() < 0.5)
        ref = _decode([data], max_payload=max_payload, check=check, first=first,
                      raise_to=raise_to, one_by_one=True)
        # Frames decoded by the call that raised are not returned: compare them when none did.
        if (got.error is None) != (ref.error is None) or (got.error is None
                                                          and got.frames != ref.frames):
            raise Crash(f"the split changed the result: {_short(got)} vs {_short(ref)}")
        if got.error is None:
            rebuilt = b"".join(encode_frame(f, DEFAULT_MAX_PAYLOAD) for f in got.frames)
            if rebuilt + got.rest != data:
                raise Crash("frames do not re-encode to the bytes they came from")
        if data == valid and first == first_seq and (got.error is not None or got.frames != frames):
            raise Crash(f"a valid stream was not decoded as sent: {got}")
        for frame in got.frames:  # the payloads go on to the message decoder
            if frame.type in MESSAGE_TYPES:
                check_decode_payload(frame.type, frame.payload)
        return REFUSED if got.error is not None else ACCEPTED


# ============================================================================ rpc
class FakeWeights:
    """A WeightFile over a bytes buffer (tests/test_rpc_core.py uses it too)."""

    def __init__(self, blob: bytes, regions: Iterable[tuple[str, int, int]]) -> None:
        self.blob = blob
        self.view = memoryview(blob)
        self.by_name: dict[str, rpc.TensorRegion] = {}
        self.by_pos: dict[tuple[int, int], rpc.TensorRegion] = {}
        for name, off, n in regions:
            region = rpc.TensorRegion(name, off, n, hashlib.sha256(blob[off : off + n]).digest())
            self.by_name[name] = region
            self.by_pos[(off, n)] = region

    def region_named(self, name: str) -> rpc.TensorRegion | None:
        return self.by_name.get(name)

    def region_at(self, file_offset: int, nbytes: int) -> rpc.TensorRegion | None:
        return self.by_pos.get((file_offset, nbytes))

    def region_with(self, sha256: bytes, nbytes: int) -> rpc.TensorRegion | None:
        return next((r for r in self.by_pos.values()
                     if r.sha256 == sha256 and r.nbytes == nbytes), None)  # fmt: skip

    def read(self, file_offset: int, nbytes: int) -> memoryview:
        return self.view[file_offset : file_offset + nbytes]


_BLOB = random.Random(7).randbytes(16384)
WEIGHTS = FakeWeights(_BLOB, [("token_embd.weight", 512, 4096), ("blk.0.attn_q.weight", 4608, 1500),
                              ("blk.0.ffn_norm.weight", 6400, 2048), ("output.weight", 8448, 6000),
                              ("tiny.weight", 15000, 100)])
_REF_TAIL = struct.Struct("<QQ32sQ")


def rpc_tensor(name: str, rng: random.Random) -> bytes:
    t = bytearray(rpc.TENSOR_SIZE)
    struct.pack_into("<QIQ", t, 0, rng.getrandbits(64), rng.randrange(40), rng.getrandbits(64))
    struct.pack_into("<4I", t, 20, 64, 4, 1, 1)
    raw = name.encode()[:63]
    t[rpc.NAME_OFFSET : rpc.NAME_OFFSET + len(raw)] = raw
    return bytes(t)


class _Cmds:
    def __init__(self) -> None:
        self.data = bytearray()
        self.fields: list[Field] = []
        self.reply_sizes: list[int] = []  # reply-bearing commands (not answered by the host)

    def add(self, cmd: int, payload: bytes) -> int:
        off = len(self.data)
        self.fields += [Field(off, 1, "little"), Field(off + 1, 8, "little")]
        self.data += rpc.encode_command(cmd, payload)
        return off


def rpc_requests(rng: random.Random, *, refs: bool) -> _Cmds:
    """A plausible llama-server RPC stream (``refs``: with weight references, as the worker
    receives it from the host)."""
    out = _Cmds()
    names = sorted(WEIGHTS.by_name)
    for _ in range(rng.choice((0, 1, 2, 4, 6, 9))):
        kind = rng.randrange(12)
        if kind == 0:
            out.add(rpc.CMD_HELLO, bytes(24))
            out.reply_sizes.append(28)
        elif kind == 1:
            out.add(rpc.CMD_DEVICE_COUNT, b"")
            out.reply_sizes.append(4)
        elif kind == 2:
            out.add(rpc.CMD_ALLOC_BUFFER, struct.pack("<IQ", 0, 1 << 20))
            out.reply_sizes.append(16)
        elif kind == 3:
            out.add(rpc.CMD_GRAPH_COMPUTE, rng.randbytes(rng.randrange(64)))
        elif kind in (4, 5, 6):  # a weight-sized SET_TENSOR of (part of) a tensor
            name = rng.choice(names)
            region = WEIGHTS.by_name[name]
            offset = rng.choice((0, 0, rng.randrange(region.nbytes)))
            n = rng.randint(0, region.nbytes - offset)
            body = bytearray(_BLOB[region.file_offset + offset : region.file_offset + offset + n])
            if body and rng.random() < 0.2:  # almost the file's bytes
                body[rng.randrange(len(body))] ^= 0x55
            if refs and rng.random() < 0.7 and n:
                head = rpc_tensor(name, rng) + b"\x00" + struct.pack("<Q", offset)
                off = out.add(rpc.REF_CMD, head + _REF_TAIL.pack(
                    region.file_offset, region.nbytes, region.sha256, n))
                base = off + rpc.REQ_HEADER_SIZE
                out.fields += [Field(base + rpc.TENSOR_SIZE + 1, 8, "little"),
                               Field(base + rpc.SET_TENSOR_HEAD, 8, "little"),
                               Field(base + rpc.SET_TENSOR_HEAD + 8, 8, "little"),
                               Field(base + rpc.SET_TENSOR_HEAD + 48, 8, "little")]
            else:
                off = out.add(rpc.CMD_SET_TENSOR, rpc_tensor(name, rng) + b"\x00"
                              + struct.pack("<Q", offset) + bytes(body))
                out.fields.append(
                    Field(off + rpc.REQ_HEADER_SIZE + rpc.TENSOR_SIZE + 1, 8, "little"))
        elif kind == 7:
            out.add(rpc.CMD_SET_TENSOR, rpc_tensor("inp_tokens", rng) + bytes(9) + b"\x01" * 32)
        elif kind == 8:
            out.add(rpc.CMD_SET_TENSOR_HASH, rpc_tensor(rng.choice(names), rng)
                    + struct.pack("<QQ", 0, rng.getrandbits(64)))
            if refs:
                out.reply_sizes.append(1)
        elif kind == 9:
            out.add(rpc.CMD_GET_TENSOR, rpc_tensor("result", rng) + struct.pack("<QQ", 0, 16))
            out.reply_sizes.append(16)
        elif kind == 10:
            out.add(rng.choice((rpc.CMD_FREE_BUFFER, rpc.CMD_BUFFER_CLEAR, rpc.CMD_INIT_TENSOR,
                                rpc.CMD_GRAPH_RECOMPUTE, rpc.CMD_MEMSET_TENSOR)),
                    rng.randbytes(rng.randrange(40)))
        else:
            out.add(rng.choice((18, 19, 0x42, 0xFF)), rng.randbytes(rng.randrange(20)))
    return out


def host_expected(data: bytes) -> tuple[bytes, bool, bool]:
    """What the worker should get from the host for request bytes ``data``.

    Returns (bytes, complete: the stream ends between commands, error: the host must
    refuse it). The host answers SET_TENSOR_HASH itself while it can track replies.
    """
    out = bytearray()
    pos, n, tracking = 0, len(data), True
    while pos < n:
        if n - pos < rpc.REQ_HEADER_SIZE:
            out += data[pos:]
            return bytes(out), False, False
        cmd, size = rpc.REQ_HEADER.unpack_from(data, pos)
        if size > rpc.MAX_COMMAND_SIZE:
            return bytes(out), False, True
        end = pos + rpc.REQ_HEADER_SIZE + size
        if cmd == rpc.CMD_SET_TENSOR_HASH and size == rpc.SET_TENSOR_HASH_SIZE and tracking:
            pass
        elif cmd == rpc.REF_CMD:
            return bytes(out), False, True
        else:
            if cmd not in rpc.REPLY_COMMANDS and cmd not in rpc.NO_REPLY_COMMANDS:
                tracking = False
            out += data[pos:end]
        if end > n:
            return bytes(out), False, False
        pos = end
    return bytes(out), True, False


def _join(chunks: Iterable[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def run_worker(weights: Any, chunks: Iterable[bytes]) -> tuple[bytes, rpc.RpcError | None, int]:
    ex = rpc.WorkerExpander(weights)
    out = bytearray()
    try:
        for chunk in chunks:
            out += _join(ex.feed(chunk))
    except rpc.RpcError as exc:
        return bytes(out), exc, ex.buffered
    return bytes(out), None, ex.buffered


class RpcTarget(Target):
    name = "rpc"

    def run_one(self, rng: random.Random) -> str:
        part = rng.random()
        if part < 0.45:
            self.mode = "host requests"
            return self._host(rng)
        if part < 0.8:
            self.mode = "worker requests"
            return self._worker(rng)
        self.mode = "host replies"
        return self._replies(rng)

    def _stream(self, rng: random.Random, refs: bool) -> tuple[bytes, _Cmds]:
        cmds = rpc_requests(rng, refs=refs)
        valid = bytes(cmds.data)
        r = rng.random()
        if r < 0.15:
            return valid, cmds
        if r < 0.25:
            return random_bytes(rng, 400), cmds
        return mutate_bytes(rng, valid, cmds.fields), cmds

    def _host(self, rng: random.Random) -> str:
        data, _ = self._stream(rng, refs=False)
        chunks = split(rng, data)
        self.last = f"host request chunks={[len(c) for c in chunks][:20]} data={_short(data)}"
        expected, complete, must_fail = host_expected(data)
        rw = rpc.HostRewriter(WEIGHTS)
        sent = bytearray()
        try:
            for chunk in chunks:
                rw.feed_request(chunk)
                sent += _join(rw.pop_to_worker())
                rw.pop_to_client()
        except rpc.RpcError:
            if not must_fail:
                raise Crash("the host refused a stream it should pass") from None
            return REFUSED
        if must_fail:
            raise Crash("the host passed a stream it must refuse")
        expanded, err, _ = run_worker(WEIGHTS, [bytes(sent)])
        if err is not None:
            raise Crash(f"the worker refused what the host sent: {err}")
        if expanded != expected if complete else not expected.startswith(expanded):
            raise Crash("host + worker did not deliver the client's bytes")
        if complete and rw.buffered:
            raise Crash(f"the host holds {rw.buffered} B after a complete stream")
        return ACCEPTED

    def _worker(self, rng: random.Random) -> str:
        data, _ = self._stream(rng, refs=True)
        weights: Any = WEIGHTS if rng.random() < 0.85 else NO_FILE
        chunks = split(rng, data)
        self.last = (f"worker {type(weights).__name__} chunks={[len(c) for c in chunks][:20]} "
                     f"data={_short(data)}")
        out, err, buffered = run_worker(weights, chunks)
        ref_out, ref_err, _ = run_worker(weights, [data])
        if (err is None) != (ref_err is None) or (err is None and out != ref_out):
            raise Crash("the worker's output depends on how the stream is split")
        if buffered > rpc.REQ_HEADER_SIZE + rpc.REF_SIZE:
            raise Crash(f"the worker buffers {buffered} B")
        if err is None and bytes([rpc.REF_CMD]) not in data and (
                not data.startswith(out) or len(data) - len(out) != buffered):
            raise Crash("bytes without a reference did not pass unchanged")
        return REFUSED if err is not None else ACCEPTED

    def _replies(self, rng: random.Random) -> str:
        cmds = rpc_requests(rng, refs=False)
        replies = b"".join(rpc.encode_reply(rng.randbytes(size)) for size in cmds.reply_sizes)
        r = rng.random()
        if r < 0.2:
            data = replies
        elif r < 0.3:
            data = random_bytes(rng, 200)
        else:
            fields = []
            pos = 0
            for size in cmds.reply_sizes:
                fields.append(Field(pos, 8, "little"))
                pos += 8 + size
            data = mutate_bytes(rng, replies, fields)
        chunks = split(rng, data)
        self.last = f"replies to {_short(bytes(cmds.data), 120)}: {_short(data)}"

        def run(parts: Iterable[bytes]) -> tuple[bytes, bool]:
            rw = rpc.HostRewriter(WEIGHTS)
            rw.feed_request(bytes(cmds.data))
            rw.pop_to_worker()
            out = bytearray(_join(rw.pop_to_client()))
            try:
                for part in parts:
                    out += _join(rw.feed_response(part))
            except rpc.RpcError:
                return bytes(out), True
            return bytes(out), False

        got, failed = run(chunks)
        ref, ref_failed = run([data])
        if failed != ref_failed or (not failed and got != ref):
            raise Crash("the host's replies depend on how the stream is split")
        return REFUSED if failed else ACCEPTED


# ============================================================================ http
SERVED = "smollm2-135m"
ALIASES = ("gpt-4o-mini",)
TOKEN = "t" * 43
HANG_AFTER = 10.0
CHAT_PATH, COMPLETION_PATH = "/v1/chat/completions", "/v1/completions"
PATHS = (CHAT_PATH, CHAT_PATH, CHAT_PATH, COMPLETION_PATH, COMPLETION_PATH, "/v1/models", "/v1",
         "/v1/", "/v1/embeddings", "/v1/chat/completions/", "/v1/chat/completions?stream=true",
         "/v1/ünï", "/v1//models", "/v1/%00", "/v1/chat%2Fcompletions")
CONTENT_TYPES = ("application/json",) * 12 + (
    "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain", "",
    "application/json-patch+json", "multipart/form-data; boundary=x", None)
METHODS = ("POST",) * 12 + ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "post")


def _text(rng: random.Random) -> str:
    return rng.choice(("hi", "What is the capital of France?", "ü" * 40, "", " ", "\n",
                       "a" * 2000, "😀 emoji", "\u2028"))


def valid_chat(rng: random.Random) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    for _ in range(rng.randint(1, 4)):
        role = rng.choice(sorted(openai.ROLES))
        content: Any = rng.choice((_text(rng), None, [{"type": "text", "text": _text(rng)}],
                                   [{"type": "text", "text": "a"}, {"type": "text", "text": ""}],
                                   []))
        m: dict[str, Any] = {"role": role, "content": content}
        if rng.random() < 0.1:
            m["name"] = "bob"
        if rng.random() < 0.05:
            m["tool_calls"] = [{"id": "1", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]
            m["tool_call_id"] = "1"
        msgs.append(m)
    body: dict[str, Any] = {"messages": msgs}
    _common_fields(rng, body)
    for key, value in (("max_completion_tokens", rng.randint(1, 64)),
                       ("logprobs", rng.random() < 0.5), ("top_logprobs", rng.randint(0, 20)),
                       ("tools", [{"type": "function", "function": {
                           "name": "f", "parameters": {"type": "object", "properties": {}}}}]),
                       ("tool_choice", rng.choice(("auto", "none", {"type": "function"}))),
                       ("parallel_tool_calls", False),
                       ("response_format", {"type": rng.choice(("text", "json_object"))})):
        if rng.random() < 0.12:
            body[key] = value
    return body


def valid_completion(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": rng.choice((_text(rng), [_text(rng)], ["a", "b"]))}
    _common_fields(rng, body)
    for key, value in (("echo", rng.random() < 0.5), ("suffix", "end"), ("best_of", 1),
                       ("logprobs", rng.randint(0, 5))):
        if rng.random() < 0.12:
            body[key] = value
    return body


def _common_fields(rng: random.Random, body: dict[str, Any]) -> None:
    for key, value in (("model", rng.choice((SERVED, *ALIASES, None))),
                       ("stream", rng.random() < 0.4), ("max_tokens", rng.randint(1, 64)),
                       ("temperature", rng.choice((0, 0.7, 2, 2.0))),
                       ("top_p", rng.choice((0, 0.5, 1))), ("n", 1), ("seed", rng.randint(-5, 5)),
                       ("presence_penalty", rng.uniform(-2, 2)),
                       ("frequency_penalty", rng.uniform(-2, 2)), ("logit_bias", {"15": -100}),
                       ("user", "u"), ("stream_options", {"include_usage": True}),
                       ("stop", rng.choice(("\n", ["a", "b", "c", "d"], [], None)))):
        if rng.random() < (0.5 if key == "stream" else 0.15):
            body[key] = value


def _answer_json(kind: str, model: object) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Paris."}}
    else:
        choice = {"index": 0, "finish_reason": "stop", "text": " Paris."}
    return {"id": "cmpl-1", "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": 1, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _sse_chunks(kind: str, model: object) -> list[bytes]:
    out = []
    for i, word in enumerate(("The ", "capital ", "is ", "Paris.")):
        if kind == "chat":
            delta: dict[str, Any] = {"content": word} if i else {"role": "assistant",
                                                                  "content": word}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        else:
            choice = {"index": 0, "text": word, "finish_reason": None}
        chunk = {"id": "c1", "object": "chunk", "created": 1, "model": model, "choices": [choice]}
        out.append(f"data: {json.dumps(chunk)}\n\n".encode())
    end = ({"index": 0, "delta": {}, "finish_reason": "stop"} if kind == "chat"
           else {"index": 0, "text": "", "finish_reason": "stop"})
    out.append(f"data: {json.dumps({'id': 'c1', 'choices': [end]})}\n\n".encode())
    out.append(b"data: [DONE]\n\n")
    return out


class _FakeContent:
    def __init__(self, chunks: list[bytes], break_after: int | None) -> None:
        self._chunks, self._break_after = chunks, break_after

    async def iter_any(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self._chunks):
            if self._break_after is not None and i == self._break_after:
                raise aiohttp.ClientPayloadError("the engine went away (fuzz)")
            yield chunk


class _FakeEngineResponse:
    def __init__(self, status: int, ctype: str, chunks: list[bytes],
                 break_after: int | None = None) -> None:
        self.status = status
        self.headers = {"Content-Type": ctype}
        self.content = _FakeContent(chunks, break_after)

    def release(self) -> None:
        pass


def _engine_extra(path: str, body: Any) -> tuple[int, Any]:
    """llama-server's other endpoints (a continuation may replay the cache through them)."""
    if not isinstance(body, dict):
        return 400, {"error": {"message": "body must be an object"}}
    if path == "/apply-template":
        return 200, {"prompt": "<|im_start|>" + json.dumps(body.get("messages"))[:200]}
    if path == "/tokenize":
        content = body.get("content")
        return 200, {"tokens": list(range(len(content) // 4 + 1)) if isinstance(content, str)
                     else []}
    if path == "/completion":
        return 200, {"content": "", "tokens_cached": len(body.get("prompt") or [])}
    return 404, {"error": {"message": f"no {path}"}}


class _FakeJsonResponse:
    def __init__(self, status: int, data: Any) -> None:
        self.status, self._data = status, data

    async def json(self) -> Any:
        return self._data

    async def __aenter__(self) -> _FakeJsonResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


class FakeEngineSession:
    """Stands in for the aiohttp session ``serve_openai`` uses to reach llama-server."""

    def __init__(self) -> None:
        self.break_next = False

    def post(self, url: str, *, json: Any = None, **kwargs: Any) -> _FakeJsonResponse:
        return _FakeJsonResponse(*_engine_extra("/" + url.rsplit("/", 1)[-1], json))

    async def request(self, method: str, url: str, *, data: bytes | None = None,
                      **kwargs: Any) -> _FakeEngineResponse:
        kind = "chat" if url.endswith(CHAT_PATH) else "completion"
        body = json.loads(data or b"{}")
        if not isinstance(body, dict):
            raise Crash(f"the engine got a body that is not an object: {_short(data)}")
        if body.get("stream") is True:
            breaks, self.break_next = self.break_next, False
            return _FakeEngineResponse(200, "text/event-stream", _sse_chunks(kind, body.get(
                "model")), break_after=2 if breaks else None)
        return _FakeEngineResponse(200, "application/json",
                                   [json.dumps(_answer_json(kind, body.get("model"))).encode()])


class FakeBackend:
    def __init__(self, engine: str | None) -> None:
        self.engine = engine

    def status(self) -> dict[str, Any]:
        return {"engine": {"state": "ready"}, "ready": True, "node": {"id": "x"}}

    def engine_url(self) -> str | None:
        return self.engine

    def is_host(self) -> bool:
        return True

    def served_model(self) -> str | None:
        return SERVED

    async def open_host_stream(self) -> tuple[Any, Any]:
        raise NoHostError("no host")

    async def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "status", self.status()


def fake_llama_app() -> web.Application:
    """A llama-server stand-in for the real gateway app."""
    app = web.Application(client_max_size=64 << 20)

    async def answer(request: web.Request) -> web.StreamResponse:
        kind = "chat" if request.path == CHAT_PATH else "completion"
        body = await request.json()
        if body.get("stream") is True:
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for chunk in _sse_chunks(kind, body.get("model")):
                await resp.write(chunk)
            return resp
        return web.json_response(_answer_json(kind, body.get("model")))

    async def extra(request: web.Request) -> web.Response:
        status, data = _engine_extra(request.path, await request.json())
        return web.json_response(data, status=status)

    app.router.add_post(CHAT_PATH, answer)
    app.router.add_post(COMPLETION_PATH, answer)
    for path in ("/apply-template", "/tokenize", "/completion"):
        app.router.add_post(path, extra)
    return app


def drain_sync(resp: ProxiedResponse) -> bytes | None:
    """The body of a response whose iterator never awaits (None if it does)."""
    parts = []
    agen = resp.body_iter
    while True:
        step: Any = agen.__anext__()  # a coroutine-like awaitable: driven by hand
        try:
            step.send(None)
        except StopIteration as stop:
            parts.append(stop.value)
            continue
        except StopAsyncIteration:
            return b"".join(parts)
        step.close()
        return None


def check_http_answer(status: int, body: bytes, *, method: str = "POST") -> str:
    """An answer's verdict: 2xx accepted, 4xx with an OpenAI-style JSON error refused."""
    if status >= 500:
        raise Crash(f"HTTP {status}: {_short(body)}")
    if status < 400:
        return ACCEPTED
    if method.upper() == "HEAD":
        return REFUSED
    try:
        err = json.loads(body)["error"]
        ok = isinstance(err, dict) and isinstance(err.get("message"), str)
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise Crash(f"HTTP {status} without an OpenAI-style JSON error: {_short(body)}")
    return REFUSED


def _check_success(kind: str, body: bytes, streamed: bool) -> None:
    if not streamed:
        answer = json.loads(body)
        if not isinstance(answer, dict) or "choices" not in answer:
            raise Crash(f"not the engine's answer: {_short(body)}")
        return
    text = body.decode()
    if not (text.rstrip().endswith("data: [DONE]") or '"stream_broken"' in text):
        raise Crash(f"a stream ended without [DONE] or an error event: {_short(body)}")


class HttpTarget(Target):
    name = "http"

    def __init__(self, *, serve_share: float = 0.12, app_share: float = 0.03) -> None:
        super().__init__()
        self.serve_share = serve_share
        self.app_share = app_share
        self.loop: asyncio.AbstractEventLoop | None = None
        self.runners: list[web.AppRunner] = []
        self.client: aiohttp.ClientSession | None = None
        self.gateway_url = ""
        self.engine = FakeEngineSession()

    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        llama = await self._serve(fake_llama_app())
        gateway = create_app(FakeBackend(llama), console_dir=None, console_token=TOKEN,
                             model_aliases=ALIASES, request_wait=0.0)
        self.gateway_url = await self._serve(gateway)
        self.client = aiohttp.ClientSession()

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    def close(self) -> None:
        if self.loop is None:
            return
        self.loop.run_until_complete(self._stop())
        self.loop.close()
        self.loop = None

    async def _stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        for runner in reversed(self.runners):
            await runner.cleanup()

    def _body(self, rng: random.Random, kind: str) -> tuple[bytes, bool]:
        """(raw body, whether it is valid)."""
        tree = valid_chat(rng) if kind == "chat" else valid_completion(rng)
        r = rng.random()
        if r < 0.1:
            return json.dumps(tree).encode(), True
        if r < 0.15:
            return random_bytes(rng, 300), False
        if r < 0.2:  # the other route's body
            other = valid_completion(rng) if kind == "chat" else valid_chat(rng)
            return json.dumps(other).encode(), False
        return mutated_json(rng, tree), False

    def run_one(self, rng: random.Random) -> str:
        kind = rng.choice(("chat", "completion"))
        raw, valid = self._body(rng, kind)
        r = rng.random()
        if r < self.app_share:
            self.mode = "gateway app over loopback"
            return self._via_app(rng, kind, raw, valid)
        if r < self.app_share + self.serve_share:
            self.mode = "serve_openai"
            return self._via_serve(rng, kind, raw, valid)
        self.mode = "validate_body + check_model"
        self.last = f"validate_body({kind!r}, {_short(raw)})"
        checked = openai.validate_body(kind, raw)
        if isinstance(checked, ProxiedResponse):
            if valid:
                raise Crash("a valid body was refused")
            body = drain_sync(checked)
            if body is None:
                raise Crash("an error response that awaits")
            if checked.status not in (400, 413):
                raise Crash(f"validation answered {checked.status}")
            return check_http_answer(checked.status, body)
        onward = openai.check_model(checked, raw, SERVED, ALIASES)
        if isinstance(onward, ProxiedResponse):
            body = drain_sync(onward)
            if onward.status != 404 or body is None:
                raise Crash(f"check_model answered {onward.status}")
            return check_http_answer(onward.status, body)
        if json.loads(onward) is None:
            raise Crash("check_model passed on something that is not JSON")
        return ACCEPTED

    def _request_shape(self, rng: random.Random, kind: str, valid: bool) -> tuple[str, str, dict[
            str, str]]:
        path = CHAT_PATH if kind == "chat" else COMPLETION_PATH
        method, headers = "POST", {"content-type": "application/json"}
        if not valid or rng.random() < 0.3:
            if rng.random() < 0.3:
                path = rng.choice(PATHS)
            if rng.random() < 0.15:
                method = rng.choice(METHODS)
            if rng.random() < 0.15:
                ctype = rng.choice(CONTENT_TYPES)
                if ctype is None:
                    headers.pop("content-type")
                else:
                    headers["content-type"] = ctype
            if rng.random() < 0.1:
                headers["accept"] = rng.choice(("text/event-stream", "*/*", "ü"))
        return method, path, headers

    def _via_serve(self, rng: random.Random, kind: str, raw: bytes, valid: bool) -> str:
        method, path, headers = self._request_shape(rng, kind, valid)
        peer = rng.random() < 0.15
        if peer:
            headers[openai.HOPS] = "1"  # as a peer's Task arrives
        # A stream that breaks half-way is continued by the node the client asked; a peer's
        # Task just relays the break (its requester continues).
        self.engine.break_next = not peer and rng.random() < 0.3
        self.last = f"serve_openai {method} {path} {headers} {_short(raw)}"
        assert self.loop is not None
        session: Any = self.engine

        async def go() -> tuple[int, bytes]:
            resp = await openai.serve_openai(FakeBackend("http://engine"), session, method, path,
                                             headers, raw, aliases=ALIASES, wait=2.0)
            body = b"".join([chunk async for chunk in resp.body_iter])
            return resp.status, body

        try:
            status, body = self.loop.run_until_complete(asyncio.wait_for(go(), HANG_AFTER))
        except TimeoutError:
            raise Crash(f"serve_openai hung for {HANG_AFTER} s") from None
        return self._verdict(kind, method, path, headers, raw, valid, status, body)

    def _verdict(self, kind: str, method: str, path: str, headers: dict[str, str], raw: bytes,
                 valid: bool, status: int, body: bytes) -> str:
        verdict = check_http_answer(status, body, method=method)
        plain = method == "POST" and path == (CHAT_PATH if kind == "chat" else COMPLETION_PATH) \
            and headers.get("content-type") == "application/json"
        if valid and plain and verdict != ACCEPTED:
            raise Crash(f"a valid request was refused: {status} {_short(body)}")
        if verdict == ACCEPTED and path in (CHAT_PATH, COMPLETION_PATH) and method == "POST":
            sent = json.loads(raw)
            _check_success(kind if path == CHAT_PATH else "completion", body,
                           isinstance(sent, dict) and sent.get("stream") is True)
        return verdict

    def _via_app(self, rng: random.Random, kind: str, raw: bytes, valid: bool) -> str:
        method, path, headers = self._request_shape(rng, kind, valid)
        chunked = rng.random() < 0.1
        self.last = f"gateway {method} {path} {headers} chunked={chunked} {_short(raw)}"
        assert self.loop is not None and self.client is not None
        client = self.client

        async def body_gen() -> AsyncIterator[bytes]:
            for part in split(rng, raw):
                yield part

        async def go() -> tuple[int, bytes]:
            data: Any = body_gen() if chunked else raw
            async with client.request(method, self.gateway_url + path, data=data,
                                      headers=headers) as resp:
                return resp.status, await resp.read()

        try:
            status, body = self.loop.run_until_complete(asyncio.wait_for(go(), HANG_AFTER))
        except TimeoutError:
            raise Crash(f"the gateway hung for {HANG_AFTER} s") from None
        return self._verdict(kind, method, path, headers, raw, valid, status, body)


# ============================================================================ session
LATENCY = 0.0005


class HostileSession(PeerSession):
    """A PeerSession whose outgoing control frames pass through ``tamper`` first."""

    tamper: Callable[[MessageType, bytes], bytes] | None = None

    def _send_frame(self, mtype: MessageType, payload: bytes) -> None:
        data = self._ctl_enc.encode(mtype, payload, self._timestamp_us())
        if self.tamper is not None:
            data = self.tamper(mtype, data)
        self._quic.send_stream_data(0, data)


class Pair:
    """Two sessions on an in-memory network with a manual clock (as tests/test_session.py)."""

    def __init__(self, env: SessionTarget, *, hostile_dialer: bool,
                 tamper: Callable[[MessageType, bytes], bytes] | None = None) -> None:
        self.now = 1000.0
        self.env = env
        self.hostile_dialer = hostile_dialer
        d_cls = HostileSession if hostile_dialer else PeerSession
        self.a_cls = PeerSession if hostile_dialer else HostileSession
        cfg = quic_configuration(env.alice, is_client=True, max_datagram_size=1452,
                                 idle_timeout=15)
        self.d: PeerSession = d_cls(QuicConnection(configuration=cfg), env.alice, env.mesh,
                                    now=self.now, handshake_timeout=5.0)
        if hostile_dialer:
            self.d.tamper = tamper  # type: ignore[attr-defined]
        self.tamper = tamper
        self.a: PeerSession | None = None
        self.events: dict[str, list[Any]] = {"d": [], "a": []}
        self.queue: list[tuple[float, int, str, bytes]] = []
        self.seq = itertools.count()
        self.sent: dict[str, list[bytes]] = {"d": [], "a": []}  # datagrams each side sent
        self.d.connect(self.address_of("a"), self.now)

    @property
    def victim(self) -> PeerSession | None:
        return self.a if self.hostile_dialer else self.d

    @property
    def hostile(self) -> PeerSession | None:
        return self.d if self.hostile_dialer else self.a

    def side(self, name: str) -> PeerSession | None:
        return self.d if name == "d" else self.a

    def _accept(self, data: bytes) -> PeerSession:
        header = parse_destination(data, CID_LENGTH)
        assert header is not None and header.is_initial
        quic = QuicConnection(configuration=self.env.server_cfg,
                              original_destination_connection_id=header.destination_cid)
        session = self.a_cls(quic, self.env.bob, self.env.mesh, now=self.now,
                             handshake_timeout=5.0)
        if not self.hostile_dialer:
            session.tamper = self.tamper  # type: ignore[attr-defined]
        return session

    def flush(self) -> None:
        for name, other in (("d", "a"), ("a", "d")):
            s = self.side(name)
            if s is None:
                continue
            for data, _addr in s.datagrams_to_send(self.now):
                self.sent[name].append(data)
                heapq.heappush(self.queue, (self.now + LATENCY, next(self.seq), other, data))
            while (ev := s.next_event()) is not None:
                self.events[name].append(ev)
                self.env.on_event(self, name, ev)

    def run(self, until: Callable[[], object] = lambda: False, limit: float = 1.0) -> None:
        end = self.now + limit
        self.flush()
        for _ in range(100_000):
            if until():
                return
            timers = [(t, n) for n in ("d", "a")
                      if (s := self.side(n)) is not None and (t := s.get_timer()) is not None]
            nxt = min([t for t, _ in timers] + [q[0] for q in self.queue[:1]], default=None)
            if nxt is None or nxt > end:
                return
            self.now = max(self.now, nxt)
            if self.queue and self.queue[0][0] <= self.now:
                _, _, dst, data = heapq.heappop(self.queue)
                if dst == "a" and self.a is None:
                    self.a = self._accept(data)
                target = self.side(dst)
                assert target is not None
                target.receive_datagram(data, self.address_of("a" if dst == "d" else "d"),
                                        self.now)
            else:
                for t, n in timers:
                    if t <= self.now:
                        s = self.side(n)
                        assert s is not None
                        s.handle_timer(self.now)
            self.flush()
        raise Crash("the sessions' timers never settle")

    @staticmethod
    def address_of(name: str) -> tuple[str, int]:
        return ("10.0.0.1", 4433) if name == "d" else ("10.0.0.2", 4433)

    def authenticated(self) -> bool:
        return self.d.authenticated and self.a is not None and self.a.authenticated

    def over(self) -> bool:
        return self.d.closed or (self.a is not None and self.a.closed)


HANDSHAKE_TYPES = (MessageType.HELLO, MessageType.PROOF, MessageType.WELCOME)


def reframe(data: bytes, mtype: int, payload: bytes) -> bytes:
    """``data``'s frame header with another type and payload (length fixed)."""
    _, seq, ts, _ = HEADER.unpack_from(data)
    return HEADER.pack(mtype & 0xFF, seq, ts, len(payload) & U32_MAX) + payload


def tamper_handshake(
    rng: random.Random, which: int, note: Callable[[bytes], None] = lambda data: None
) -> Callable[[MessageType, bytes], bytes]:
    """Mutates the ``which``-th handshake frame the hostile side sends (``note`` sees it)."""
    count = itertools.count()

    def tamper(mtype: MessageType, data: bytes) -> bytes:
        if mtype not in HANDSHAKE_TYPES or next(count) != which:
            return data
        out = _tampered(mtype, data)
        note(out)
        return out

    def _tampered(mtype: MessageType, data: bytes) -> bytes:
        payload = data[HEADER_SIZE:]
        r = rng.random()
        if r < 0.55:
            try:
                tree = json.loads(payload)
            except ValueError:
                tree = {}
            if isinstance(tree, dict) and rng.random() < 0.4:
                for key in ("pubkey", "nonce", "mac", "sig"):
                    if key in tree and rng.random() < 0.5:  # mutate what base64 carries
                        raw = base64.b64decode(tree[key])
                        tree[key] = base64.b64encode(mutate_bytes(rng, raw)).decode()
                new = to_bytes(rng, dumps(tree))
            else:
                new = mutated_json(rng, tree)
            return reframe(data, mtype, new)
        if r < 0.65:
            return reframe(data, rng.choice((*HANDSHAKE_TYPES, MessageType.ERROR,
                                             MessageType.HEARTBEAT, 0x99)), payload)
        if r < 0.75:
            return reframe(data, mtype, random_bytes(rng, 300))
        fields = [Field(0, 1), Field(1, 4), Field(5, 8), Field(13, 4)]
        return mutate_bytes(rng, data, fields)

    return tamper


def _hostile_call(pair: Pair, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """A raw QUIC call of the hostile side; False once its connection cannot send."""
    if pair.over():
        return False
    try:
        fn(*args, **kwargs)
    except Exception:  # the attacker's own QUIC stack refuses (closed, stream limits)
        return False
    return True


class SessionTarget(Target):
    name = "session"

    def __init__(self) -> None:
        super().__init__()
        self.pair: Pair | None = None
        self.initials: list[bytes] = []
        self.others: list[bytes] = []

    def setup(self) -> None:
        self.mesh = MeshCredentials.generate()
        self.alice, self.bob = NodeIdentity.generate(), NodeIdentity.generate()
        self.server_cfg = quic_configuration(self.bob, is_client=False, max_datagram_size=1452,
                                             idle_timeout=15)
        # A corpus of real datagrams: a whole handshake, control frames, a stream.
        pair = Pair(self, hostile_dialer=True)
        pair.run(pair.authenticated)
        assert pair.authenticated(), "the reference handshake failed"
        assert pair.a is not None
        pair.d.send_control(MessageType.HEARTBEAT, b'{"inc":1}')
        sid = pair.d.open_stream(MessageType.OPEN_TUNNEL, b'{"service":"rpc"}')
        pair.d.send_data(sid, b"x" * 3000)
        pair.run(limit=0.1)
        for data in pair.sent["d"] + pair.sent["a"]:
            header = parse_destination(data, CID_LENGTH)
            (self.initials if header is not None and header.is_initial else self.others).append(
                data)
        assert self.initials and self.others

    def reset(self) -> None:
        self.pair = None

    # -- what the node does with a session's events (net/gossip.py decodes control frames)
    def on_event(self, pair: Pair, name: str, ev: Any) -> None:
        s = pair.side(name)
        assert s is not None
        if isinstance(ev, ControlFrameReceived):
            try:
                msg = decode_payload(ev.frame.type, ev.frame.payload)
            except ProtocolError as exc:
                s.close(f"protocol error: {exc}", ERR_PROTOCOL)
                return
            if not isinstance(msg, Heartbeat | Gossip | Goodbye):
                s.close(f"unexpected {ev.frame.type.name} on the control stream", ERR_PROTOCOL)
        elif isinstance(ev, StreamOpened):
            ftype = ev.first_frame.type
            with contextlib.suppress(ProtocolError):
                decode_payload(ftype, ev.first_frame.payload)
        elif isinstance(ev, StreamDataReceived) and ev.data and not s.closed:
            s.consumed(ev.stream_id, len(ev.data))  # the application reads it all

    def run_one(self, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.45:
            self.mode = "datagrams opening a connection"
            return self._new_connection_datagram(rng)
        if r < 0.6:
            self.mode = "datagrams into a connection"
            return self._datagram_into_established(rng)
        if r < 0.8:
            self.mode = "authenticated peer's frames/streams"
            return self._authenticated_garbage(rng)
        self.mode = "handshake frames"
        return self._handshake_garbage(rng)

    def _check_closed(self, ev: Any) -> None:
        """A session may drop its peer for a protocol or authentication reason, never for an
        internal error. The QUIC stack failing on hostile input is contained by design
        (``PeerSession._stack_failed``: that connection closes, with a warning): noted."""
        if isinstance(ev, SessionClosed) and ev.code == ERR_INTERNAL and not ev.by_peer:
            if ev.reason.startswith("QUIC stack error"):
                self.note(f"contained {STACK} error: {ev.reason[len('QUIC stack error: '):]}")
                return
            raise Crash(f"a session closed with an internal error: {ev.reason}")

    def _verdict(self, pair: Pair) -> str:
        """Refused if the victim dropped its peer (for a declared reason), else accepted."""
        for name in ("d", "a"):
            for ev in pair.events[name]:
                self._check_closed(ev)
        victim = pair.victim
        if victim is not None and victim.closed:
            if not victim.close_reason:
                raise Crash("a peer was dropped without a reason")
            return REFUSED
        return REFUSED if pair.over() else ACCEPTED

    def _established(self, rng: random.Random) -> Pair:
        if self.pair is None or self.pair.over():
            pair = Pair(self, hostile_dialer=rng.random() < 0.5)
            pair.run(pair.authenticated)
            if not pair.authenticated():
                raise Crash("a clean handshake failed")
            self.pair = pair
        return self.pair

    def _new_connection_datagram(self, rng: random.Random) -> str:
        base = rng.choice(self.initials)
        r = rng.random()
        if r < 0.1:
            data = random_bytes(rng, 1500)
        elif r < 0.2:
            data = base
        else:
            fields = [Field(1, 4), Field(5, 1), Field(6 + base[5], 1)] if len(base) > 7 else []
            data = mutate_bytes(rng, base, fields)
            if rng.random() < 0.5 and len(data) < 1200:
                data += bytes(1200 - len(data))  # the endpoint only accepts big Initials
        self.last = f"new connection datagram {_short(data)}"
        header = parse_destination(data, CID_LENGTH)
        if header is None or not header.is_initial or len(data) < 1200:
            return REFUSED  # the endpoint routes it nowhere
        quic = QuicConnection(configuration=self.server_cfg,
                              original_destination_connection_id=header.destination_cid)
        session = PeerSession(quic, self.bob, self.mesh, now=1.0, handshake_timeout=5.0)
        session.receive_datagram(data, ("10.0.0.9", 1), 1.0)
        answered = False
        for now in (1.0, 1.5, 6.0):
            sent = session.datagrams_to_send(now)
            answered = answered or (now == 1.0 and bool(sent) and not session.closed)
            session.handle_timer(now)
        events = []
        while (ev := session.next_event()) is not None:
            events.append(ev)
        for ev in events:
            self._check_closed(ev)
        # Accepted: the session answered (TLS went on); refused: dropped or closed at once.
        return ACCEPTED if answered else REFUSED

    def _datagram_into_established(self, rng: random.Random) -> str:
        pair = self._established(rng)
        victim, hostile = pair.victim, pair.hostile
        assert victim is not None and hostile is not None
        hostile_name = "d" if pair.hostile_dialer else "a"
        r = rng.random()
        if r < 0.5:
            # A fresh datagram of this very connection, then mutated.
            hostile.send_control(MessageType.HEARTBEAT, b'{"inc":2}')
            fresh = [d for d, _ in hostile.datagrams_to_send(pair.now)]
            base = fresh[0] if fresh else rng.choice(self.others)
            data = mutate_bytes(rng, base) if rng.random() < 0.9 else base
        elif r < 0.7 and pair.sent[hostile_name]:
            data = rng.choice(pair.sent[hostile_name])  # a replay
        elif r < 0.85:
            data = mutate_bytes(rng, rng.choice(self.others + self.initials))
        else:
            data = random_bytes(rng, 1500)
        self.last = f"datagram into an established session {_short(data)}"
        victim.receive_datagram(data, pair.address_of(hostile_name), pair.now)
        pair.run(limit=0.05)
        return self._verdict(pair)

    def _authenticated_garbage(self, rng: random.Random) -> str:
        pair = self._established(rng)
        victim, hostile = pair.victim, pair.hostile
        assert victim is not None and hostile is not None
        quic: Any = hostile._quic  # a hostile peer bypasses its own session's rules
        r = rng.random()
        if r < 0.5:
            # Control frames past the session's encoder: valid ones, then mutated.
            enc: FrameEncoder = hostile._ctl_enc
            data = b"".join(
                enc.encode(t, valid_payload(rng, t) if t in MESSAGE_TYPES else random_bytes(rng),
                           rng.getrandbits(64))
                for t in (rng.choice((MessageType.HEARTBEAT, MessageType.GOSSIP,
                                      MessageType.CREDIT, MessageType.GOODBYE, MessageType.TASK,
                                      MessageType.BODY, MessageType.HELLO))
                          for _ in range(rng.randint(1, 3)))
            )
            if rng.random() < 0.85:
                data = mutate_bytes(rng, data, [Field(0, 1), Field(1, 4), Field(13, 4)])
            chunks = split(rng, data)
            self.last = f"control stream bytes {_short(data)}"
            for chunk in chunks:
                if not _hostile_call(pair, quic.send_stream_data, 0, chunk):
                    break
                pair.run(limit=0.01)
            pair.run(limit=0.05)
            verdict = self._verdict(pair)
            self.pair = None  # the hostile side's frame count is off now
            return verdict
        # A stream: a first frame (valid or not), data, maybe FIN or a reset.
        sid = int(quic.get_next_available_stream_id())
        if rng.random() < 0.1:
            sid = int(quic.get_next_available_stream_id(is_unidirectional=True))
        elif rng.random() < 0.1:
            sid += 4 * rng.randint(1, 3)
        ftype = rng.choice((MessageType.OPEN_TUNNEL, MessageType.TASK, MessageType.FETCH_MODEL,
                            rng.choice(list(MessageType))))
        payload = (valid_payload(rng, ftype) if ftype in MESSAGE_TYPES else random_bytes(rng))
        data = encode_frame(Frame(ftype, 0, 0, payload), DEFAULT_MAX_PAYLOAD) + random_bytes(rng)
        if rng.random() < 0.7:
            data = mutate_bytes(rng, data, [Field(0, 1), Field(1, 4), Field(13, 4)])
        end = rng.random() < 0.5
        reset = rng.random() < 0.15
        self.last = f"stream {sid} end={end} reset={reset} {_short(data)}"
        chunks = split(rng, data)
        for i, chunk in enumerate(chunks):
            if not _hostile_call(pair, quic.send_stream_data, sid, chunk,
                                 end_stream=end and i == len(chunks) - 1):
                break
            pair.run(limit=0.01)
        if reset and not end:
            _hostile_call(pair, quic.reset_stream, sid, 0)
        if rng.random() < 0.2 and victim.has_stream(sid):
            victim.close_stream(sid)
        pair.run(limit=0.05)
        return self._verdict(pair)

    def _handshake_garbage(self, rng: random.Random) -> str:
        hostile_dialer = rng.random() < 0.5
        # The dialer sends Hello and Proof; the acceptor Hello, Proof and Welcome.
        which = rng.randrange(2 if hostile_dialer else 3)
        who = f"handshake frame {which} from the {'dialer' if hostile_dialer else 'acceptor'}"
        self.last = who

        def note(data: bytes) -> None:
            self.last = f"{who}: {_short(data)}"

        pair = Pair(self, hostile_dialer=hostile_dialer, tamper=tamper_handshake(rng, which, note))
        pair.run(lambda: pair.authenticated() or pair.over(), limit=2.0)
        if not pair.authenticated() and not pair.over():
            pair.run(limit=6.0)  # the handshake deadline must end it
            if not pair.over():
                raise Crash("a tampered handshake neither completed nor ended")
        return self._verdict(pair)
