"""Typed, validated payloads of the DCF control messages.

Public API:

- frozen dataclasses :class:`NodeInfo`, :class:`MemberRecord`,
  :class:`Heartbeat`, :class:`Gossip`, :class:`Goodbye`,
  :class:`ErrorMessage`, :class:`OpenTunnel`, :class:`TaskHead`,
  :class:`ResultHead`, :class:`Credit`, :class:`FetchModel`, :class:`ModelFile`;
  ``Message`` is their union (without ``NodeInfo`` and
  ``MemberRecord``, which only travel inside a :class:`Gossip`);
- ``encode_payload(msg) -> bytes``: UTF-8 JSON; raises ``ValueError`` if the
  message would not pass :func:`decode_payload` on the other side (a bug
  here must not look like a hostile peer over there);
- ``decode_payload(type, payload) -> Message``: raises
  :class:`~mesh_inference.core.dcf.ProtocolError` on anything that is not
  exactly the schema (bad UTF-8/JSON, duplicate keys, missing fields,
  wrong types, out-of-range numbers, over-long strings or lists);
- ``message_type(msg) -> MessageType``: the frame type that carries ``msg``.

Hello/Proof/Welcome belong to ``handshake.py``; Body frames are raw bytes. Keys
this version does not know are ignored, so a newer peer may add fields.

Wire shapes (see DESIGN.md): Heartbeat ``{"inc"}``; Gossip ``{"records":
[{"info": {NodeInfo…}, "inc", "status"}…]}``; Goodbye/Error ``{"reason"}``;
OpenTunnel ``{"service"}``; Task ``{"method","path","headers"}`` and Result
``{"status","headers"}`` where headers is a list of ``[name, value]`` pairs
(an object could not carry repeated header names); Credit ``{"s": stream id,
"n": bytes}`` (the receiver of stream ``s`` consumed ``n`` more bytes, so its
sender may have that much more in flight; handled inside the peer session);
FetchModel ``{"sha256": 64 hex, "offset"}`` opens a model-file stream and
ModelFile ``{"size"}`` answers it (then the file's bytes from ``offset``;
see models/transfer.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mesh_inference.core.dcf import DEFAULT_MAX_PAYLOAD, MessageType, ProtocolError
from mesh_inference.core.jointoken import parse_addr

__all__ = [
    "HTTP_METHODS",
    "MAX_ADDRS",
    "MAX_HEADERS",
    "MAX_INCARNATION",
    "MAX_RECORDS",
    "MAX_STREAM_ID",
    "ROLES",
    "STATUSES",
    "Credit",
    "ErrorMessage",
    "FetchModel",
    "Goodbye",
    "Gossip",
    "Heartbeat",
    "MemberRecord",
    "Message",
    "ModelFile",
    "NodeInfo",
    "OpenTunnel",
    "ResultHead",
    "TaskHead",
    "decode_payload",
    "encode_payload",
    "is_node_id",
    "message_type",
]

# Limits: generous for real use, small enough that one frame cannot make a
# peer hold much state (records × addrs × string length stays < 1 MiB).
MAX_NAME = 64
MAX_VERSION = 32
MAX_MODEL_REF = 1024
MAX_ADDR = 262  # 253-char host name + ":" + port, or a bracketed IPv6 address
MAX_ADDRS = 16
MAX_RECORDS = 256
MAX_HEADERS = 64
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8192
MAX_PATH = 8192
MAX_REASON = 1024
MAX_SERVICE = 32
MAX_ENGINE_STATE = 32
MAX_MEMORY = 1 << 60  # 1 EiB: anything bigger is a bug or a lie
MAX_INCARNATION = (1 << 63) - 1
MAX_STREAM_ID = (1 << 62) - 1  # QUIC stream ids are 62-bit
MAX_CREDIT = 1 << 40  # far beyond any window; a bigger grant is a bug or a lie

ROLES = ("member", "client")
STATUSES = ("alive", "suspect", "dead", "left")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_NODE_ID = re.compile(r"[0-9a-f]{16}")
_SERVICE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_ENGINE_STATE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# A sha256 digest as lowercase hex: model files are named by it on the wire and on disk.
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 header field name
# C0 controls and DEL (and C1) never belong in names, reasons or header values;
# surrogates would make the string impossible to re-encode as UTF-8.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def is_node_id(value: object) -> bool:
    """16 lowercase hex characters (first 8 bytes of SHA-256 of the public key)."""
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node tells the mesh about itself (carried in gossip)."""

    node_id: str
    name: str
    role: str  # "member" | "client"
    memory_bytes: int  # offered to the mesh, measured once at start
    addrs: tuple[str, ...]  # "host:port" QUIC addresses
    http_port: int
    model: str | None  # the model ref this node was started with
    has_model: bool  # holds the mesh model's file locally (may host)
    version: str
    # Size of the GGUF this node holds, so nodes without the file can plan.
    model_bytes: int = 0
    rpc_ready: bool = False  # its rpc-server is up (a worker is usable)
    engine_state: str = "stopped"  # the node's llama-server state, for the console
    # Raised by a model switch; the mesh serves the model with the highest
    # (epoch, ref) among alive nodes, and every node adopts it.
    model_epoch: int = 0
    # sha256 (hex) of the mesh model's file on this node, once indexed: equal
    # digests let the host send weight references instead of weight bytes.
    model_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class MemberRecord:
    info: NodeInfo
    incarnation: int
    status: str  # "alive" | "suspect" | "dead" | "left"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    incarnation: int


@dataclass(frozen=True, slots=True)
class Gossip:
    records: tuple[MemberRecord, ...]


@dataclass(frozen=True, slots=True)
class Goodbye:
    reason: str


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    reason: str


@dataclass(frozen=True, slots=True)
class OpenTunnel:
    service: str
    # The host asks for the worker's tensor manifest: before the RPC bytes, the worker
    # sends u32 LE count + count x 32-byte sha256 of the tensors its model file has.
    manifest: bool = False


@dataclass(frozen=True, slots=True)
class TaskHead:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ResultHead:
    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Credit:
    """The receiver of ``stream_id`` consumed ``n`` more bytes of it (control stream)."""

    stream_id: int
    n: int


@dataclass(frozen=True, slots=True)
class FetchModel:
    """First frame of a model-file stream: the file whose sha256 is ``sha256``, from ``offset``."""

    sha256: str  # 64 lowercase hex
    offset: int  # bytes the fetcher already has (a resumed transfer)


@dataclass(frozen=True, slots=True)
class ModelFile:
    """The holder's answer to :class:`FetchModel`: the whole file's size; bytes follow."""

    size: int


Message = (
    Heartbeat | Gossip | Goodbye | ErrorMessage | OpenTunnel | TaskHead | ResultHead | Credit
    | FetchModel | ModelFile
)

_TYPES: dict[type[Any], MessageType] = {
    Heartbeat: MessageType.HEARTBEAT,
    Gossip: MessageType.GOSSIP,
    Goodbye: MessageType.GOODBYE,
    ErrorMessage: MessageType.ERROR,
    OpenTunnel: MessageType.OPEN_TUNNEL,
    TaskHead: MessageType.TASK,
    ResultHead: MessageType.RESULT,
    Credit: MessageType.CREDIT,
    FetchModel: MessageType.FETCH_MODEL,
    ModelFile: MessageType.MODEL_FILE,
}


def message_type(msg: Message) -> MessageType:
    try:
        return _TYPES[type(msg)]
    except KeyError:
        raise TypeError(f"not a DCF message: {type(msg).__name__}") from None


# ---------------------------------------------------------------------- encode
def _info_json(info: NodeInfo) -> dict[str, Any]:
    return {
        "node_id": info.node_id,
        "name": info.name,
        "role": info.role,
        "memory_bytes": info.memory_bytes,
        "addrs": list(info.addrs),
        "http_port": info.http_port,
        "model": info.model,
        "has_model": info.has_model,
        "version": info.version,
        "model_bytes": info.model_bytes,
        "rpc_ready": info.rpc_ready,
        "engine_state": info.engine_state,
        "model_epoch": info.model_epoch,
        "model_sha256": info.model_sha256,
    }


def _to_json(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Heartbeat):
        return {"inc": msg.incarnation}
    if isinstance(msg, Gossip):
        return {
            "records": [
                {"info": _info_json(r.info), "inc": r.incarnation, "status": r.status}
                for r in msg.records
            ]
        }
    if isinstance(msg, Goodbye | ErrorMessage):
        return {"reason": msg.reason}
    if isinstance(msg, OpenTunnel):
        return {"service": msg.service, "manifest": True} if msg.manifest else {
            "service": msg.service}
    if isinstance(msg, TaskHead):
        return {"method": msg.method, "path": msg.path, "headers": [list(h) for h in msg.headers]}
    if isinstance(msg, ResultHead):
        return {"status": msg.status, "headers": [list(h) for h in msg.headers]}
    if isinstance(msg, Credit):
        return {"s": msg.stream_id, "n": msg.n}
    if isinstance(msg, FetchModel):
        return {"sha256": msg.sha256, "offset": msg.offset}
    if isinstance(msg, ModelFile):
        return {"size": msg.size}
    raise TypeError(f"not a DCF message: {type(msg).__name__}")


def encode_payload(msg: Message) -> bytes:
    """The frame payload for ``msg``; ``ValueError`` if the peer would reject it."""
    mtype = message_type(msg)
    try:
        payload = json.dumps(
            _to_json(msg), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"cannot encode {type(msg).__name__}: {exc}") from None
    try:
        back = decode_payload(mtype, payload)
    except ProtocolError as exc:
        raise ValueError(f"invalid {type(msg).__name__}: {exc}") from None
    if back != msg:  # e.g. a list where a tuple belongs: equal JSON, unequal value
        raise ValueError(f"{type(msg).__name__} does not survive the wire: {msg!r}")
    return payload


# ---------------------------------------------------------------------- decode
T = TypeVar("T")


class _Obj:
    """A JSON object being validated; ``where`` names it in error messages."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a JSON object, got {_kind(value)}")
        self._d: dict[str, Any] = value
        self._where = where

    def has(self, key: str) -> bool:
        return key in self._d

    def raw(self, key: str) -> Any:
        if key not in self._d:
            raise ProtocolError(f"{self._where}: missing field {key!r}")
        return self._d[key]

    def fail(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"{self._where}.{key}: {why}")

    def int_(self, key: str, lo: int, hi: int) -> int:
        v = self.raw(key)
        if type(v) is not int:  # bool is an int subclass; 1.0 is not an integer on our wire
            raise self.fail(key, f"expected an integer, got {_kind(v)}")
        if not lo <= v <= hi:
            raise self.fail(key, f"{v} is outside [{lo}, {hi}]")
        return v

    def bool_(self, key: str) -> bool:
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self.fail(key, f"expected true/false, got {_kind(v)}")
        return v

    def str_(self, key: str, max_len: int, *, allow_empty: bool = False) -> str:
        return _check_str(self.raw(key), f"{self._where}.{key}", max_len, allow_empty)

    def opt_str(self, key: str, max_len: int) -> str | None:
        v = self.raw(key)
        return None if v is None else _check_str(v, f"{self._where}.{key}", max_len, False)

    def list_(self, key: str, max_len: int, item: Callable[[Any, str], T]) -> tuple[T, ...]:
        v = self.raw(key)
        if not isinstance(v, list):
            raise self.fail(key, f"expected a list, got {_kind(v)}")
        if len(v) > max_len:
            raise self.fail(key, f"{len(v)} entries, at most {max_len} allowed")
        return tuple(item(x, f"{self._where}.{key}[{i}]") for i, x in enumerate(v))

    def choice(self, key: str, allowed: tuple[str, ...] | frozenset[str]) -> str:
        v = self.raw(key)
        if not isinstance(v, str) or v not in allowed:
            raise self.fail(key, f"{_short(v)} is not one of {sorted(allowed)}")
        return v


def _kind(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_str(v: object, where: str, max_len: int, allow_empty: bool) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{where}: expected a string, got {_kind(v)}")
    if len(v) > max_len:
        raise ProtocolError(f"{where}: {len(v)} characters, at most {max_len} allowed")
    if not v and not allow_empty:
        raise ProtocolError(f"{where}: must not be empty")
    if _CONTROL.search(v):
        raise ProtocolError(f"{where}: contains control or surrogate characters")
    return v


def _addr(v: object, where: str) -> str:
    s = _check_str(v, where, MAX_ADDR, False)
    try:
        parse_addr(s)
    except ValueError as exc:
        raise ProtocolError(f"{where}: {exc}") from None
    return s


def _node_info(v: object, where: str) -> NodeInfo:
    o = _Obj(v, where)
    node_id = o.str_("node_id", 16)
    if not is_node_id(node_id):
        raise o.fail("node_id", f"{node_id!r} is not 16 lowercase hex characters")
    engine_state = o.str_("engine_state", MAX_ENGINE_STATE)
    if not _ENGINE_STATE.fullmatch(engine_state):
        raise o.fail("engine_state", f"{engine_state!r} is not a lowercase word")
    addrs = o.list_("addrs", MAX_ADDRS, _addr)
    if len(set(addrs)) != len(addrs):
        raise o.fail("addrs", "repeated address")
    sha = o.opt_str("model_sha256", 64)
    if sha is not None and not SHA256_HEX.fullmatch(sha):
        raise o.fail("model_sha256", "not 64 lowercase hex characters")
    return NodeInfo(
        node_id=node_id,
        name=o.str_("name", MAX_NAME),
        role=o.choice("role", ROLES),
        memory_bytes=o.int_("memory_bytes", 0, MAX_MEMORY),
        addrs=addrs,
        http_port=o.int_("http_port", 0, 65535),
        model=o.opt_str("model", MAX_MODEL_REF),
        has_model=o.bool_("has_model"),
        version=o.str_("version", MAX_VERSION),
        model_bytes=o.int_("model_bytes", 0, MAX_MEMORY),
        rpc_ready=o.bool_("rpc_ready"),
        engine_state=engine_state,
        model_epoch=o.int_("model_epoch", 0, MAX_INCARNATION),
        model_sha256=sha,
    )


def _record(v: object, where: str) -> MemberRecord:
    o = _Obj(v, where)
    return MemberRecord(
        info=_node_info(o.raw("info"), f"{where}.info"),
        incarnation=o.int_("inc", 0, MAX_INCARNATION),
        status=o.choice("status", STATUSES),
    )


def _header(v: object, where: str) -> tuple[str, str]:
    if not isinstance(v, list) or len(v) != 2:
        raise ProtocolError(f"{where}: expected a [name, value] pair, got {_short(v)}")
    name = _check_str(v[0], f"{where}[0]", MAX_HEADER_NAME, False)
    if not _TOKEN.fullmatch(name):
        raise ProtocolError(f"{where}[0]: {_short(name)} is not a valid header name")
    value = v[1]
    if not isinstance(value, str):
        raise ProtocolError(f"{where}[1]: expected a string, got {_kind(value)}")
    if len(value) > MAX_HEADER_VALUE:
        raise ProtocolError(f"{where}[1]: {len(value)} characters, at most {MAX_HEADER_VALUE}")
    if _HEADER_VALUE_BAD.search(value):
        # CR/LF in a value is how header injection and request smuggling start.
        raise ProtocolError(f"{where}[1]: contains control characters")
    return name, value


def _path(o: _Obj) -> str:
    path = o.str_("path", MAX_PATH)
    if not path.startswith("/"):
        raise o.fail("path", f"{_short(path)} must start with '/'")
    if path.startswith("//"):
        # "//host/x" is a scheme-relative URL: joined to a base URL it changes the host.
        raise o.fail("path", f"{_short(path)} must not start with '//'")
    if any(c.isspace() for c in path) or "#" in path:
        raise o.fail("path", "must not contain whitespace or a fragment")
    return path


def _heartbeat(o: _Obj) -> Heartbeat:
    return Heartbeat(o.int_("inc", 0, MAX_INCARNATION))


def _gossip(o: _Obj) -> Gossip:
    records = o.list_("records", MAX_RECORDS, _record)
    ids = [r.info.node_id for r in records]
    if len(set(ids)) != len(ids):
        raise o.fail("records", "a node appears twice")
    return Gossip(records)


def _goodbye(o: _Obj) -> Goodbye:
    return Goodbye(o.str_("reason", MAX_REASON, allow_empty=True))


def _error(o: _Obj) -> ErrorMessage:
    return ErrorMessage(o.str_("reason", MAX_REASON, allow_empty=True))


def _open_tunnel(o: _Obj) -> OpenTunnel:
    service = o.str_("service", MAX_SERVICE)
    if not _SERVICE.fullmatch(service):
        raise o.fail("service", f"{service!r} is not a service name")
    return OpenTunnel(service, o.bool_("manifest") if o.has("manifest") else False)


def _task(o: _Obj) -> TaskHead:
    return TaskHead(
        method=o.choice("method", HTTP_METHODS),
        path=_path(o),
        headers=o.list_("headers", MAX_HEADERS, _header),
    )


def _result(o: _Obj) -> ResultHead:
    return ResultHead(
        status=o.int_("status", 100, 599),
        headers=o.list_("headers", MAX_HEADERS, _header),
    )


def _credit(o: _Obj) -> Credit:
    return Credit(o.int_("s", 0, MAX_STREAM_ID), o.int_("n", 1, MAX_CREDIT))


def _fetch_model(o: _Obj) -> FetchModel:
    sha = o.str_("sha256", 64)
    if not SHA256_HEX.fullmatch(sha):
        raise o.fail("sha256", "not 64 lowercase hex characters")
    return FetchModel(sha, o.int_("offset", 0, MAX_MEMORY))


def _model_file(o: _Obj) -> ModelFile:
    return ModelFile(o.int_("size", 0, MAX_MEMORY))


_DECODERS: dict[MessageType, Callable[[_Obj], Message]] = {
    MessageType.HEARTBEAT: _heartbeat,
    MessageType.GOSSIP: _gossip,
    MessageType.GOODBYE: _goodbye,
    MessageType.ERROR: _error,
    MessageType.OPEN_TUNNEL: _open_tunnel,
    MessageType.TASK: _task,
    MessageType.RESULT: _result,
    MessageType.CREDIT: _credit,
    MessageType.FETCH_MODEL: _fetch_model,
    MessageType.MODEL_FILE: _model_file,
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON")


def decode_payload(type: MessageType, payload: bytes) -> Message:
    """Parse and validate the JSON payload of a frame of ``type``."""
    decoder = _DECODERS.get(type)
    if decoder is None:
        raise ProtocolError(f"{getattr(type, 'name', type)} frames carry no message payload here")
    where = type.name
    if len(payload) > DEFAULT_MAX_PAYLOAD:
        raise ProtocolError(f"{where}: payload of {len(payload)} B is too large")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{where}: payload is not UTF-8 ({exc.reason})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ProtocolError as exc:
        raise ProtocolError(f"{where}: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints beyond the digit limit
        raise ProtocolError(f"{where}: payload is not JSON ({exc})") from None
    return decoder(_Obj(value, where))
