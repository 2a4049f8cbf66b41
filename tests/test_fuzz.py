"""Fuzzing: the generators of scripts/fuzz.py with a small count, property tests, and the
regressions the fuzzer found (tests/fuzzgen.py has the generators; docs/fuzzing.md the
100,000-input runs)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import fuzzgen
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_inference.api import openai
from mesh_inference.api.gateway import create_app
from mesh_inference.core import rpc
from mesh_inference.core.dcf import DEFAULT_MAX_PAYLOAD, U32_MAX, Frame, MessageType, encode_frame
from mesh_inference.core.handshake import AuthFailed, Handshake
from mesh_inference.core.identity import MeshCredentials, NodeIdentity, load_p256_public_key
from mesh_inference.core.membership import Membership
from mesh_inference.core.messages import NodeInfo
from mesh_inference.net.endpoint import MeshEndpoint
from mesh_inference.net.gossip import MembershipDriver
from mesh_inference.net.proxy import ProxiedResponse

ROOT = Path(__file__).resolve().parent.parent
COUNT = 2000  # per target: about 8 s in all here; scripts/fuzz.py runs 100,000
SEED = 20240611

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------- the generators
@pytest.mark.parametrize("target", fuzzgen.TARGETS)
def test_generated_inputs_never_crash(target: str) -> None:
    tally = fuzzgen.run_target(target, COUNT, SEED)
    assert tally.crashes == 0, "\n\n".join(tally.failures)
    assert tally.inputs == COUNT
    # The generators reach both sides of every parser.
    assert tally.accepted > COUNT // 20 and tally.refused > COUNT // 20, tally.line()


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("fuzz_script", ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_reports_counts_and_fails_on_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script()
    assert script.main(["--count", "30", "--target", "messages", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "messages  inputs      30" in out and "crashes 0" in out

    class Broken(fuzzgen.Target):
        def run_one(self, rng: Any) -> str:
            if rng.random() < 0.5:
                raise KeyError("boom")
            return fuzzgen.ACCEPTED

    monkeypatch.setattr(fuzzgen, "make_target", lambda name: Broken())
    assert script.main(["--count", "20", "--target", "dcf", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "CRASH dcf seed 1 input" in out and "KeyError('boom')" in out


def test_an_error_logged_while_an_input_runs_is_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    class Logs(fuzzgen.Target):
        def run_one(self, rng: Any) -> str:
            logging.getLogger("mesh_inference.x").error("internal error on a peer session")
            return fuzzgen.REFUSED

    monkeypatch.setattr(fuzzgen, "make_target", lambda name: Logs())
    tally = fuzzgen.run_target("dcf", 3, 1)
    assert tally.crashes == 3 and "internal error on a peer session" in tally.failures[0]


# ---------------------------------------------------------------------- properties
def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({min(p, len(data)) for p in points})
    return [data[a:b] for a, b in zip([0, *edges], [*edges, len(data)], strict=True)]


cuts = st.lists(st.integers(0, 2000), max_size=8)
quick = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@quick
@given(st.binary(max_size=400), cuts, st.sampled_from([0, 17, 4096, DEFAULT_MAX_PAYLOAD]),
       st.booleans(), st.booleans())
def test_dcf_any_bytes_decode_to_frames_or_protocol_error_in_any_split(
    data: bytes, points: list[int], max_payload: int, check: bool, one_by_one: bool
) -> None:
    # _decode raises Crash on any broken invariant and lets no other exception through.
    def run(chunks: list[bytes], by_one: bool) -> Any:
        return fuzzgen._decode(chunks, max_payload=max_payload, check=check, first=0,
                               raise_to=None, one_by_one=by_one)

    whole, parts = run([data], True), run(cut(data, points), one_by_one)
    assert (whole.error is None) == (parts.error is None)
    if whole.error is None:
        assert whole.frames == parts.frames and whole.rest == parts.rest
        assert b"".join(encode_frame(f) for f in whole.frames) + whole.rest == data


frames = st.lists(st.tuples(st.sampled_from(list(MessageType)), st.integers(0, 2**64 - 1),
                            st.binary(max_size=80)), max_size=6)


@quick
@given(frames, st.integers(0, U32_MAX), cuts)
def test_dcf_encoded_frames_come_back_as_sent_in_any_split(
    spec: list[tuple[MessageType, int, bytes]], first: int, points: list[int]
) -> None:
    sent = [Frame(t, (first + i) & U32_MAX, ts, p) for i, (t, ts, p) in enumerate(spec)]
    data = b"".join(encode_frame(f) for f in sent)
    got = fuzzgen._decode(cut(data, points), max_payload=DEFAULT_MAX_PAYLOAD, check=True,
                          first=first, raise_to=None, one_by_one=False)
    assert got.error is None and got.frames == sent and got.rest == b""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=16,
)
# Shapes close to the schemas, so that validation goes deep before it refuses.
near_messages = st.fixed_dictionaries({}, optional={
    "inc": st.integers(), "s": st.integers(), "n": st.integers(), "reason": st.text(),
    "service": st.text(max_size=40), "method": st.sampled_from(["GET", "POST", "get", ""]),
    "path": st.text(max_size=20), "headers": st.lists(st.lists(st.text(max_size=10), max_size=3),
                                                      max_size=3),
    "status": st.integers(), "sha256": st.text(alphabet="0123456789abcdef", max_size=66),
    "offset": st.integers(), "size": st.integers(), "records": st.lists(json_values, max_size=2),
})


@quick
@given(st.sampled_from(fuzzgen.MESSAGE_TYPES), json_values | near_messages)
def test_decode_payload_any_json_is_a_message_or_a_protocol_error(
    mtype: MessageType, value: Any
) -> None:
    payload = fuzzgen.dumps(value).encode("utf-8", "surrogatepass")
    # check_decode_payload: ProtocolError or a message that survives encode_payload.
    assert fuzzgen.check_decode_payload(mtype, payload) in (fuzzgen.ACCEPTED, fuzzgen.REFUSED)


@quick
@given(st.sampled_from(fuzzgen.MESSAGE_TYPES), st.binary(max_size=300))
def test_decode_payload_any_bytes_is_a_message_or_a_protocol_error(
    mtype: MessageType, payload: bytes
) -> None:
    assert fuzzgen.check_decode_payload(mtype, payload) in (fuzzgen.ACCEPTED, fuzzgen.REFUSED)


commands = st.lists(st.tuples(
    st.sampled_from([*range(20), rpc.REF_CMD, 0xFF]), st.binary(max_size=64),
), max_size=6).map(lambda cs: b"".join(rpc.encode_command(c, p) for c, p in cs))


@quick
@given(commands | st.binary(max_size=600), cuts)
def test_rpc_host_delivers_the_clients_bytes_or_refuses_in_any_split(
    data: bytes, points: list[int]
) -> None:
    expected, complete, must_fail = fuzzgen.host_expected(data)
    rw = rpc.HostRewriter(fuzzgen.WEIGHTS)
    sent = bytearray()
    try:
        for chunk in cut(data, points):
            rw.feed_request(chunk)
            sent += fuzzgen._join(rw.pop_to_worker())
    except rpc.RpcError:
        assert must_fail
        return
    assert not must_fail
    out, err, _ = fuzzgen.run_worker(fuzzgen.WEIGHTS, [bytes(sent)])
    assert err is None
    assert out == expected if complete else expected.startswith(out)


@quick
@given(commands | st.binary(max_size=600), cuts, st.booleans())
def test_rpc_worker_output_does_not_depend_on_the_split(
    data: bytes, points: list[int], has_file: bool
) -> None:
    weights: Any = fuzzgen.WEIGHTS if has_file else fuzzgen.NO_FILE
    whole = fuzzgen.run_worker(weights, [data])
    parts = fuzzgen.run_worker(weights, cut(data, points))
    assert (whole[1] is None) == (parts[1] is None)
    if whole[1] is None:
        assert whole[0] == parts[0]


chat_like = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(sorted(openai.ROLES)) | st.text(max_size=5)},
        optional={"content": json_values, "name": json_values, "tool_calls": json_values}),
        max_size=3)},
    optional={k: json_values for k in ("model", "stream", "max_tokens", "temperature", "top_p",
                                       "n", "stop", "tools", "response_format", "prompt")},
)


@quick
@given(st.sampled_from(["chat", "completion"]), json_values | chat_like)
def test_validate_body_answers_a_body_or_an_openai_style_4xx(kind: str, value: Any) -> None:
    raw = fuzzgen.dumps(value).encode("utf-8", "surrogatepass")
    checked = openai.validate_body(kind, raw)
    if isinstance(checked, ProxiedResponse):
        body = fuzzgen.drain_sync(checked)
        assert body is not None and checked.status in (400, 413)
        assert fuzzgen.check_http_answer(checked.status, body) == fuzzgen.REFUSED
    else:
        assert isinstance(checked, dict)
        onward = openai.check_model(checked, raw, fuzzgen.SERVED, fuzzgen.ALIASES)
        assert isinstance(onward, bytes) or onward.status == 404


# ---------------------------------------------------------------------- regressions
def test_rpc_replies_after_an_unknown_command_pass_untouched_whatever_the_split() -> None:
    """Found by the fuzzer: once an unknown command stopped reply tracking, the rest of
    the chunk that held the last tracked reply was still parsed as replies (and a reply
    of the unknown command refused as oversized), while the next chunk passed untouched:
    the verdict depended on how TCP cut the stream."""
    requests = (rpc.encode_command(rpc.CMD_GET_TENSOR, bytes(312))
                + rpc.encode_command(0x42, b"from a newer llama.cpp")
                + rpc.encode_command(rpc.CMD_HELLO, bytes(24)))
    replies = rpc.encode_reply(bytes(16)) + b"\xff" * 8 + b"a reply of unknown framing"
    for at in range(len(replies) + 1):
        rw = rpc.HostRewriter(fuzzgen.WEIGHTS)
        rw.feed_request(requests)
        assert rw.pop_to_client() == []
        out = b"".join(rw.feed_response(replies[:at]) + rw.feed_response(replies[at:]))
        assert out == replies, at


def test_head_answers_from_the_openai_routes_carry_no_body() -> None:
    """Found by the fuzzer: a HEAD to /v1/* got the JSON error written after the
    headers (a HEAD answer has no body), which desynchronised keep-alive connections."""

    async def main() -> None:
        app = create_app(fuzzgen.FakeBackend(None), console_dir=None,
                         console_token=fuzzgen.TOKEN, request_wait=0.0)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Two requests on one connection: the second answer must parse.
            writer.write(b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                         b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        finally:
            await runner.cleanup()
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 405 ")
        assert rest.startswith(b"HTTP/1.1 200 "), rest[:80]

    asyncio.run(main())


def p256_key_with_another_curve_oid() -> bytes:
    der = bytearray(NodeIdentity.generate().public_key_der())
    oid = bytes.fromhex("2a8648ce3d030107")  # 1.2.840.10045.3.1.7, prime256v1
    at = der.index(oid)
    der[at + 1] ^= 0x04  # 1.2.768.10045.3.1.7: an OID no library knows
    return bytes(der)


def test_a_public_key_of_an_unknown_curve_is_refused_not_raised() -> None:
    """Found by the fuzzer: cryptography raises UnsupportedAlgorithm (not ValueError) for
    an unknown curve, which escaped the handshake as an internal error."""
    assert load_p256_public_key(p256_key_with_another_curve_oid()) is None


def hello_frame(**fields: Any) -> Frame:
    mesh, ident = MESH, NodeIdentity.generate()
    hello = {"v": 1, "node_id": ident.node_id, "pubkey": base64.b64encode(
        ident.public_key_der()).decode(), "mesh_id": mesh.mesh_id,
        "nonce": base64.b64encode(bytes(32)).decode(), **fields}
    return Frame(MessageType.HELLO, 0, 0, json.dumps(hello).encode())


MESH = MeshCredentials.generate()


@pytest.mark.parametrize("payload", [b"[" * 3000, b'{"v":' + b"[" * 2000 + b"]" * 2000 + b"}"])
def test_a_hello_nested_past_the_stack_fails_authentication(payload: bytes) -> None:
    """Found by the fuzzer: json.loads raises RecursionError (not ValueError) for deep
    nesting, which escaped the handshake as an internal error (and a logged traceback)."""
    hs = Handshake(NodeIdentity.generate(), MESH, is_dialer=False, channel_binding=bytes(32))
    with pytest.raises(AuthFailed, match="not JSON"):
        hs.handle_frame(Frame(MessageType.HELLO, 0, 0, payload))
    dialer = Handshake(NodeIdentity.generate(), MESH, is_dialer=True, channel_binding=bytes(32))
    with pytest.raises(AuthFailed, match="refused by peer: no reason given"):
        dialer.handle_frame(Frame(MessageType.ERROR, 0, 0, payload))


def test_a_hello_with_a_key_of_an_unknown_curve_fails_authentication() -> None:
    hs = Handshake(NodeIdentity.generate(), MESH, is_dialer=False, channel_binding=bytes(32))
    bad = base64.b64encode(p256_key_with_another_curve_oid()).decode()
    with pytest.raises(AuthFailed, match="not a P-256 key"):
        hs.handle_frame(hello_frame(pubkey=bad))


# ---------------------------------------------------------------------- a bad peer
def info(node_id: str) -> NodeInfo:
    return NodeInfo(node_id=node_id, name="n", role="member", memory_bytes=1 << 30,
                    addrs=("127.0.0.1:1",), http_port=9337, model=None, has_model=False,
                    version="0.1.0")


async def endpoint(lost: list[tuple[str, str]],
                   on_frame: Callable[[str, Frame], None]) -> MeshEndpoint:
    async def no_streams(*args: Any) -> None:
        pass

    ep = MeshEndpoint(NodeIdentity.generate(), MESH, host="127.0.0.1", port=0,
                      on_peer_connected=lambda conn: None,
                      on_peer_lost=lambda peer, reason: lost.append((peer, reason)),
                      on_control_frame=on_frame, on_stream=no_streams)
    await ep.start()
    return ep


async def until(pred: Callable[[], object], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not pred():  # noqa: ASYNC110 (polls state the endpoint owns)
            await asyncio.sleep(0.01)


@pytest.fixture
async def pair() -> AsyncIterator[dict[str, Any]]:
    a_lost: list[tuple[str, str]] = []
    b_lost: list[tuple[str, str]] = []
    a = await endpoint(a_lost, lambda peer, frame: None)
    driver_box: list[MembershipDriver] = []
    b = await endpoint(b_lost, lambda peer, frame: driver_box[0].control_frame(peer, frame))
    loop = asyncio.get_running_loop()
    driver = MembershipDriver(
        Membership(info(b.identity.node_id), loop.time()),
        send=b.send_control, disconnect=b.disconnect, on_events=lambda events: None,
    )
    driver_box.append(driver)
    yield {"a": a, "b": b, "a_lost": a_lost, "b_lost": b_lost, "driver": driver}
    await driver.stop()
    await a.close()
    await b.close()


@pytest.mark.parametrize("payload", [
    b'{"records":[{"info":NaN}]}',
    b'{"records":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"records":[],"records":[]}',
    b"\xff\xfe{}",
])
async def test_a_peer_sending_a_bad_control_message_is_dropped_with_a_logged_reason(
    pair: dict[str, Any], payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair["a"], pair["b"]
    caplog.set_level(logging.INFO, logger="mesh_inference")
    peer = await a.dial(f"127.0.0.1:{b.port}")
    await until(lambda: b.peers())
    a.send_control(peer, MessageType.GOSSIP, payload)
    await until(lambda: pair["b_lost"] and pair["a_lost"])
    (lost_id, reason), = pair["b_lost"]
    assert lost_id == a.identity.node_id and reason.startswith("protocol error: GOSSIP")
    assert pair["a_lost"][0][1] == reason  # the peer is told why
    logged = [r.getMessage() for r in caplog.records if r.name == "mesh_inference.net.endpoint"]
    assert any(a.identity.node_id in m and reason in m for m in logged), logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

