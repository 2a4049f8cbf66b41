"""Control-message payloads: round trips, and strict refusal of everything else."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_inference.core.dcf import MessageType, ProtocolError
from mesh_inference.core.messages import (
    MAX_ADDRS,
    MAX_HEADERS,
    MAX_RECORDS,
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
    is_node_id,
    message_type,
)

INFO = NodeInfo(
    node_id="0123456789abcdef",
    name="gaming-pc",
    role="member",
    memory_bytes=8 << 30,
    addrs=("192.168.1.10:7400", "[fe80::1]:7400", "gpu-box.local:7400"),
    http_port=9337,
    model="smollm2-135m",
    has_model=True,
    version="0.1.0",
    model_bytes=100 << 20,
    rpc_ready=True,
    engine_state="ready",
)

EXAMPLES: list[Message] = [
    Heartbeat(0),
    Heartbeat((1 << 63) - 1),
    Gossip(()),
    Gossip((MemberRecord(INFO, 3, "alive"),
            MemberRecord(replace(INFO, node_id="fedcba9876543210", model=None, role="client",
                                 addrs=(), name="laptop ☕"), 0, "suspect"))),
    Goodbye("shutting down"),
    Goodbye(""),
    ErrorMessage("auth failed"),
    OpenTunnel("rpc"),
    TaskHead("POST", "/v1/chat/completions?x=1",
             (("content-type", "application/json"), ("x-a", "1"), ("x-a", "2"))),
    TaskHead("GET", "/v1/models", ()),
    ResultHead(200, (("content-type", "text/event-stream"), ("set-cookie", "a=b; Path=/"))),
    ResultHead(503, ()),
    FetchModel("ab" * 32, 0),
    FetchModel("0" * 64, 40 << 30),
    ModelFile(0),
    ModelFile(40 << 30),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    payload = encode_payload(msg)
    assert json.loads(payload)  # a JSON object on the wire
    assert decode_payload(message_type(msg), payload) == msg


def test_wire_shapes_follow_the_design() -> None:
    assert json.loads(encode_payload(Heartbeat(5))) == {"inc": 5}
    assert json.loads(encode_payload(Goodbye("bye"))) == {"reason": "bye"}
    assert json.loads(encode_payload(OpenTunnel("rpc"))) == {"service": "rpc"}
    rec = json.loads(encode_payload(Gossip((MemberRecord(INFO, 2, "alive"),))))["records"][0]
    assert rec["inc"] == 2 and rec["status"] == "alive"
    assert rec["info"]["node_id"] == INFO.node_id and rec["info"]["addrs"] == list(INFO.addrs)
    task = json.loads(encode_payload(TaskHead("GET", "/health", (("a", "1"),))))
    assert task == {"method": "GET", "path": "/health", "headers": [["a", "1"]]}
    fetch = json.loads(encode_payload(FetchModel("ab" * 32, 7)))
    assert fetch == {"sha256": "ab" * 32, "offset": 7}
    assert json.loads(encode_payload(ModelFile(9))) == {"size": 9}


def test_message_types() -> None:
    assert message_type(Heartbeat(0)) is MessageType.HEARTBEAT
    assert message_type(Gossip(())) is MessageType.GOSSIP
    assert message_type(Goodbye("")) is MessageType.GOODBYE
    assert message_type(ErrorMessage("")) is MessageType.ERROR
    assert message_type(OpenTunnel("rpc")) is MessageType.OPEN_TUNNEL
    assert message_type(TaskHead("GET", "/", ())) is MessageType.TASK
    assert message_type(ResultHead(200, ())) is MessageType.RESULT
    assert message_type(FetchModel("0" * 64, 0)) is MessageType.FETCH_MODEL
    assert message_type(ModelFile(0)) is MessageType.MODEL_FILE
    with pytest.raises(TypeError):
        message_type(INFO)  # type: ignore[arg-type]


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    assert decode_payload(MessageType.HEARTBEAT, b'{"inc":1,"future":[1,2]}') == Heartbeat(1)


# ---------------------------------------------------------------------- invalid
def info_json(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(encode_payload(Gossip((MemberRecord(INFO, 0, "alive"),))))[
        "records"][0]["info"]
    for k, v in changes.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return d


def gossip_with(info: dict[str, Any], inc: Any = 0, status: Any = "alive") -> bytes:
    return json.dumps({"records": [{"info": info, "inc": inc, "status": status}]}).encode()


def task(**changes: Any) -> bytes:
    d: dict[str, Any] = {"method": "POST", "path": "/v1/completions", "headers": []}
    d.update(changes)
    return json.dumps(d).encode()


H, G, T, R = MessageType.HEARTBEAT, MessageType.GOSSIP, MessageType.TASK, MessageType.RESULT
INVALID: list[tuple[str, MessageType, bytes, str]] = [
    # encoding and JSON
    ("not utf-8", H, b'{"inc": "\xff"}', "not UTF-8"),
    ("not json", H, b"{inc: 1}", "not JSON"),
    ("empty", H, b"", "not JSON"),
    ("trailing data", H, b'{"inc":1} {}', "not JSON"),
    ("array", H, b"[1]", "expected a JSON object"),
    ("string", H, b'"hi"', "expected a JSON object"),
    ("null", H, b"null", "expected a JSON object"),
    ("duplicate key", H, b'{"inc":1,"inc":2}', "duplicate key"),
    ("NaN", H, b'{"inc":NaN}', "NaN"),
    ("Infinity", H, b'{"inc":Infinity}', "Infinity"),
    ("deep nesting", H, b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b',"inc":1}', "deep"),
    ("huge int", H, b'{"inc":' + b"9" * 5000 + b"}", "not JSON"),
    # heartbeat
    ("missing inc", H, b"{}", "missing field 'inc'"),
    ("bool inc", H, b'{"inc":true}', "expected an integer"),
    ("float inc", H, b'{"inc":1.0}', "expected an integer"),
    ("string inc", H, b'{"inc":"1"}', "expected an integer"),
    ("negative inc", H, b'{"inc":-1}', "outside"),
    ("inc too big", H, b'{"inc":%d}' % (1 << 63), "outside"),
    # gossip
    ("records missing", G, b"{}", "missing field 'records'"),
    ("records not a list", G, b'{"records":{}}', "expected a list"),
    ("record not an object", G, b'{"records":[1]}', "records[0]: expected a JSON object"),
    ("too many records", G,
     json.dumps({"records": [{"info": info_json(node_id=f"{i:016x}"), "inc": 0, "status": "alive"}
                             for i in range(MAX_RECORDS + 1)]}).encode(), "at most 256"),
    ("duplicate record", G,
     json.dumps({"records": [{"info": info_json(), "inc": 0, "status": "alive"}] * 2}).encode(),
     "twice"),
    ("bad status", G, gossip_with(info_json(), status="zombie"), "status"),
    ("bad inc", G, gossip_with(info_json(), inc=-3), "outside"),
    ("node id upper", G, gossip_with(info_json(node_id="0123456789ABCDEF")), "lowercase hex"),
    ("node id short", G, gossip_with(info_json(node_id="0123")), "lowercase hex"),
    ("node id long", G, gossip_with(info_json(node_id="0123456789abcdef0")), "at most 16"),
    ("node id not hex", G, gossip_with(info_json(node_id="0123456789abcdeg")), "lowercase hex"),
    ("node id newline", G, gossip_with(info_json(node_id="0123456789abcde\n")), "control"),
    ("missing name", G, gossip_with(info_json(name=...)), "missing field 'name'"),
    ("empty name", G, gossip_with(info_json(name="")), "empty"),
    ("long name", G, gossip_with(info_json(name="x" * 65)), "at most 64"),
    ("control in name", G, gossip_with(info_json(name="a\x1b[2Jb")), "control"),
    ("surrogate in name", G, b'{"records":[{"info":' + json.dumps(info_json()).encode().replace(
        b'"gaming-pc"', b'"\\ud800"') + b',"inc":0,"status":"alive"}]}', "surrogate"),
    ("bad role", G, gossip_with(info_json(role="admin")), "role"),
    ("memory negative", G, gossip_with(info_json(memory_bytes=-1)), "outside"),
    ("memory float", G, gossip_with(info_json(memory_bytes=1.5)), "integer"),
    ("memory huge", G, gossip_with(info_json(memory_bytes=1 << 61)), "outside"),
    ("http port", G, gossip_with(info_json(http_port=65536)), "outside"),
    ("has_model int", G, gossip_with(info_json(has_model=1)), "true/false"),
    ("rpc_ready missing", G, gossip_with(info_json(rpc_ready=...)), "missing"),
    ("engine state", G, gossip_with(info_json(engine_state="Ready!")), "lowercase word"),
    ("model not string", G, gossip_with(info_json(model=5)), "expected a string"),
    ("model too long", G, gossip_with(info_json(model="m" * 1025)), "at most 1024"),
    ("version too long", G, gossip_with(info_json(version="1" * 33)), "at most 32"),
    ("addrs not list", G, gossip_with(info_json(addrs="1.2.3.4:5")), "expected a list"),
    ("too many addrs", G,
     gossip_with(info_json(addrs=[f"10.0.0.{i}:7400" for i in range(MAX_ADDRS + 1)])),
     "at most 16"),
    ("duplicate addr", G, gossip_with(info_json(addrs=["10.0.0.1:1", "10.0.0.1:1"])), "repeated"),
    ("addr no port", G, gossip_with(info_json(addrs=["10.0.0.1"])), "host:port"),
    ("bad model sha", G, gossip_with(info_json(model_sha256="AB" * 32)), "model_sha256"),
    ("short model sha", G, gossip_with(info_json(model_sha256="ab")), "model_sha256"),
    ("addr port 0", G, gossip_with(info_json(addrs=["10.0.0.1:0"])), "host:port"),
    ("addr port big", G, gossip_with(info_json(addrs=["10.0.0.1:65536"])), "host:port"),
    ("addr port word", G, gossip_with(info_json(addrs=["10.0.0.1:http"])), "host:port"),
    ("addr raw ipv6", G, gossip_with(info_json(addrs=["fe80::1:7400"])), "host name"),
    ("addr bad ipv6", G, gossip_with(info_json(addrs=["[fe80::zz]:7400"])), "IPv6"),
    ("addr spaces", G, gossip_with(info_json(addrs=["evil host:7400"])), "host name"),
    ("addr empty host", G, gossip_with(info_json(addrs=[":7400"])), "host:port"),
    ("addr not str", G, gossip_with(info_json(addrs=[7400])), "expected a string"),
    # goodbye / error / tunnel
    ("goodbye no reason", MessageType.GOODBYE, b"{}", "missing field 'reason'"),
    ("goodbye long", MessageType.GOODBYE, json.dumps({"reason": "r" * 1025}).encode(), "at most"),
    ("error not str", MessageType.ERROR, b'{"reason":["x"]}', "expected a string"),
    ("tunnel service", MessageType.OPEN_TUNNEL, b'{"service":"../etc"}', "service name"),
    ("tunnel empty", MessageType.OPEN_TUNNEL, b'{"service":""}', "empty"),
    # task / result
    ("method", T, task(method="CONNECT"), "method"),
    ("method lower", T, task(method="post"), "method"),
    ("path relative", T, task(path="v1/completions"), "start with '/'"),
    ("path absolute url", T, task(path="http://evil/"), "start with '/'"),
    ("path scheme-relative", T, task(path="//evil.example/x"), "'//'"),
    ("path space", T, task(path="/a b"), "whitespace"),
    ("path crlf", T, task(path="/a\r\nHost: evil"), "control"),
    ("path fragment", T, task(path="/a#b"), "fragment"),
    ("path empty", T, task(path=""), "empty"),
    ("path too long", T, task(path="/" + "a" * 8192), "at most"),
    ("headers object", T, task(headers={"a": "b"}), "expected a list"),
    ("header not pair", T, task(headers=[["a"]]), "pair"),
    ("header triple", T, task(headers=[["a", "b", "c"]]), "pair"),
    ("header name", T, task(headers=[["bad name", "x"]]), "header name"),
    ("header name colon", T, task(headers=[["a:b", "x"]]), "header name"),
    ("header crlf", T, task(headers=[["x-a", "1\r\nx-b: 2"]]), "control"),
    ("header nul", T, task(headers=[["x-a", "1\x00"]]), "control"),
    ("header value int", T, task(headers=[["x-a", 1]]), "expected a string"),
    ("header value long", T, task(headers=[["x-a", "v" * 8193]]), "at most"),
    ("too many headers", T, task(headers=[["x", "y"]] * (MAX_HEADERS + 1)), "at most 64"),
    ("status low", R, b'{"status":99,"headers":[]}', "outside"),
    ("status high", R, b'{"status":600,"headers":[]}', "outside"),
    ("status string", R, b'{"status":"200","headers":[]}', "integer"),
    # model files
    ("fetch sha upper", MessageType.FETCH_MODEL, b'{"sha256":"' + b"AB" * 32 + b'","offset":0}',
     "hex"),
    ("fetch sha path", MessageType.FETCH_MODEL, b'{"sha256":"../x","offset":0}', "hex"),
    ("fetch offset neg", MessageType.FETCH_MODEL, b'{"sha256":"' + b"a" * 64 + b'","offset":-1}',
     "outside"),
    ("fetch no offset", MessageType.FETCH_MODEL, b'{"sha256":"' + b"a" * 64 + b'"}', "offset"),
    ("file size neg", MessageType.MODEL_FILE, b'{"size":-1}', "outside"),
    ("file size huge", MessageType.MODEL_FILE, b'{"size":1e30}', "integer"),
    # frames that carry no JSON message here
    ("hello", MessageType.HELLO, b"{}", "no message payload"),
    ("proof", MessageType.PROOF, b"{}", "no message payload"),
    ("welcome", MessageType.WELCOME, b"{}", "no message payload"),
    ("body", MessageType.BODY, b"raw", "no message payload"),
]


@pytest.mark.parametrize(("mtype", "payload", "why"), [x[1:] for x in INVALID],
                         ids=[x[0] for x in INVALID])
def test_invalid_payloads_are_refused(mtype: MessageType, payload: bytes, why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_payload(mtype, payload)
    assert why.lower() in str(info.value).lower()


def test_errors_say_where() -> None:
    with pytest.raises(ProtocolError, match=r"GOSSIP\.records\[0\]\.info\.addrs\[0\]"):
        decode_payload(G, gossip_with(info_json(addrs=["nope"])))


def test_oversized_payload_is_refused() -> None:
    big = b'{"reason":"' + b"x" * (1 << 20) + b'"}'
    with pytest.raises(ProtocolError, match="too large"):
        decode_payload(MessageType.GOODBYE, big)


@pytest.mark.parametrize(
    "msg",
    [
        Heartbeat(-1),
        Heartbeat(True),
        Goodbye("x" * 2000),
        OpenTunnel("RPC"),
        TaskHead("TRACE", "/", ()),
        TaskHead("GET", "//x", ()),
        TaskHead("GET", "/", (("a", "b\n"),)),
        TaskHead("GET", "/", [("a", "b")]),  # type: ignore[arg-type]
        ResultHead(42, ()),
        Gossip((MemberRecord(replace(INFO, name="n" * 65), 0, "alive"),)),
        Gossip((MemberRecord(replace(INFO, node_id="XYZ"), 0, "alive"),)),
        Gossip((MemberRecord(replace(INFO, addrs=["1.2.3.4:5"]), 0, "alive"),)),  # type: ignore[arg-type]
        Gossip((MemberRecord(INFO, 0, "gone"),)),
        Gossip((MemberRecord(replace(INFO, name="\udc80"), 0, "alive"),)),
    ],
)
def test_encode_refuses_what_the_peer_would_refuse(msg: Message) -> None:
    with pytest.raises(ValueError):
        encode_payload(msg)


def test_is_node_id() -> None:
    assert is_node_id("0123456789abcdef")
    assert not is_node_id("0123456789abcdef\n")
    assert not is_node_id(b"0123456789abcdef")
    assert not is_node_id(None)


# ---------------------------------------------------------------------- properties
text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,5}){0,2}", fullmatch=True
)
addrs = st.builds(lambda h, p: f"{h}:{p}", hostnames, st.integers(1, 65535))
infos = st.builds(
    NodeInfo,
    node_id=st.from_regex(r"[0-9a-f]{16}", fullmatch=True),
    name=text,
    role=st.sampled_from(["member", "client"]),
    memory_bytes=st.integers(0, 1 << 60),
    addrs=st.lists(addrs, max_size=4, unique=True).map(tuple),
    http_port=st.integers(0, 65535),
    model=st.none() | text,
    has_model=st.booleans(),
    version=text,
    model_bytes=st.integers(0, 1 << 40),
    rpc_ready=st.booleans(),
    engine_state=st.sampled_from(["stopped", "starting", "ready", "crashed", "waiting"]),
)
records = st.builds(MemberRecord, infos, st.integers(0, (1 << 63) - 1),
                    st.sampled_from(["alive", "suspect", "dead", "left"]))
header_pairs = st.lists(
    st.tuples(st.from_regex(r"[a-zA-Z0-9-]{1,20}", fullmatch=True),
              st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)),
    max_size=5,
).map(tuple)
messages = st.one_of(
    st.builds(Heartbeat, st.integers(0, (1 << 63) - 1)),
    st.lists(records, max_size=5, unique_by=lambda r: r.info.node_id).map(
        lambda rs: Gossip(tuple(rs))),
    st.builds(Goodbye, st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=50)),
    st.builds(ErrorMessage, st.text(st.characters(blacklist_categories=("Cc", "Cs")),
                                    max_size=50)),
    st.builds(OpenTunnel, st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True)),
    st.builds(TaskHead, st.sampled_from(["GET", "POST", "DELETE"]),
              st.from_regex(r"/[a-z0-9/?=&.%-]{0,30}", fullmatch=True)
              .filter(lambda p: not p.startswith("//")), header_pairs),
    st.builds(ResultHead, st.integers(100, 599), header_pairs),
    st.builds(FetchModel, st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
              st.integers(0, 1 << 60)),
    st.builds(ModelFile, st.integers(0, 1 << 60)),
)


@given(messages)
def test_round_trip_property(msg: Message) -> None:
    assert decode_payload(message_type(msg), encode_payload(msg)) == msg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["inc", "records", "info", "reason", "node_id", "addrs",
                                       "status", "method", "path", "headers", "service",
                                       "sha256", "offset", "size"]),
                      children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300)
@given(st.sampled_from(list(MessageType)), json_values)
def test_random_json_raises_nothing_but_protocol_error(mtype: MessageType, value: Any) -> None:
    try:
        msg = decode_payload(mtype, json.dumps(value).encode())
    except ProtocolError:
        return
    assert decode_payload(mtype, encode_payload(msg)) == msg  # what passes, survives a round trip


@settings(max_examples=300)
@given(st.sampled_from(list(MessageType)), st.binary(max_size=200))
def test_random_bytes_raise_nothing_but_protocol_error(mtype: MessageType, payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_payload(mtype, payload)


def test_open_tunnel_may_ask_for_the_workers_manifest() -> None:
    asked = OpenTunnel("rpc", manifest=True)
    assert json.loads(encode_payload(asked)) == {"service": "rpc", "manifest": True}
    assert decode_payload(MessageType.OPEN_TUNNEL, encode_payload(asked)) == asked
    # An older host's request (no field) asks for none.
    assert decode_payload(MessageType.OPEN_TUNNEL, b'{"service":"rpc"}') == OpenTunnel("rpc")
    with pytest.raises(ProtocolError, match="manifest"):
        decode_payload(MessageType.OPEN_TUNNEL, b'{"service":"rpc","manifest":"yes"}')


def test_manifest_codec_bounds_the_count() -> None:
    from mesh_inference.core.rpc import (
        MANIFEST_HEADER,
        MAX_MANIFEST,
        RpcError,
        decode_manifest,
        encode_manifest,
        manifest_length,
    )

    digests = bytes(range(32)) + bytes(32)
    wire = encode_manifest(digests)
    assert manifest_length(wire[: MANIFEST_HEADER.size]) == 64
    assert decode_manifest(wire[MANIFEST_HEADER.size :]) == {bytes(range(32)), bytes(32)}
    with pytest.raises(RpcError):
        manifest_length(MANIFEST_HEADER.pack(MAX_MANIFEST + 1))
    with pytest.raises(ValueError):
        encode_manifest(b"x" * 33)
