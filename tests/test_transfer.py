"""Model files between peers (models/transfer.py) over two real QUIC endpoints on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ggufs import tiny_gguf

from mesh_inference.core.dcf import Frame, MessageType, encode_frame
from mesh_inference.core.identity import MeshCredentials, NodeIdentity
from mesh_inference.core.messages import NodeInfo
from mesh_inference.models.refs import ModelError, local_copy_path, resolve_model
from mesh_inference.models.transfer import (
    FetchTarget,
    FileServer,
    HeldFile,
    ModelFetcher,
    PeerRefused,
    TransferError,
    TransferInterrupted,
    Unfetchable,
    fetch_model,
    fetch_target,
)
from mesh_inference.net.endpoint import MeshEndpoint, QuicStreamWriter

pytestmark = pytest.mark.timeout(60)

SIZE = 3 * (1 << 20) + 12345  # several chunks, not a multiple of one
Handler = Callable[[str, Frame, asyncio.StreamReader, QuicStreamWriter], Awaitable[None]]


@dataclass
class Pair:
    fetcher: MeshEndpoint
    holder_id: str
    data: bytes
    sha256: str
    server: FileServer
    requests: list[bytes] = field(default_factory=list)  # first frames' payloads
    handler: Handler | None = None  # replaces the holder's FileServer when set

    async def open(self, payload: bytes) -> tuple[asyncio.StreamReader, Any]:
        return await self.fetcher.open_stream(self.holder_id, MessageType.FETCH_MODEL, payload)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    data = os.urandom(SIZE)
    model = tmp_path / "holder" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    def held(want: str) -> HeldFile | None:
        return HeldFile(model, SIZE) if want == sha else None

    mesh = MeshCredentials.generate()
    p: Pair

    async def on_stream(
        peer: str, first: Frame, reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        assert first.type == MessageType.FETCH_MODEL
        p.requests.append(first.payload)
        if p.handler is not None:
            await p.handler(peer, first, reader, writer)
        else:
            await p.server.serve(peer, first, writer)

    async def no_streams(*_: Any) -> None:
        raise AssertionError("the fetcher accepts no streams")

    def endpoint(handler: Any) -> MeshEndpoint:
        return MeshEndpoint(
            NodeIdentity.generate(), mesh, host="127.0.0.1",
            on_peer_connected=lambda _c: None, on_peer_lost=lambda _p, _r: None,
            on_control_frame=lambda _p, _f: None, on_stream=handler,
        )  # fmt: skip

    holder, fetcher = endpoint(on_stream), endpoint(no_streams)
    port = await holder.start()
    await fetcher.start()
    try:
        holder_id = await fetcher.dial(f"127.0.0.1:{port}")
        p = Pair(fetcher, holder_id, data, sha, FileServer(held))
        yield p
    finally:
        await fetcher.close()
        await holder.close()


def frame(mtype: MessageType, payload: bytes, seq: int = 0) -> bytes:
    return encode_frame(Frame(mtype, seq, 0, payload))


def head(size: int) -> bytes:
    return frame(MessageType.MODEL_FILE, json.dumps({"size": size}).encode())


def answering(raw: bytes) -> Handler:
    """A holder that answers ``raw`` bytes, whatever was asked, then FIN."""

    async def handler(
        _peer: str, _first: Frame, _reader: asyncio.StreamReader, writer: QuicStreamWriter
    ) -> None:
        writer.write(raw)
        await writer.drain()
        writer.write_eof()

    return handler


async def test_a_whole_file_crosses_verified_and_lands_in_place(pair: Pair, tmp_path: Path) -> None:
    dest = tmp_path / "mine" / "model.gguf"
    seen: list[tuple[int, int]] = []
    got = await fetch_model(pair.open, pair.sha256, dest, expected_size=SIZE,
                            progress=lambda have, total: seen.append((have, total)))  # fmt: skip
    assert got == dest and dest.read_bytes() == pair.data
    assert not dest.with_name("model.gguf.part").exists()
    assert seen[0] == (0, SIZE) and seen[-1] == (SIZE, SIZE)
    assert pair.server.sent_bytes == SIZE
    assert json.loads(pair.requests[0]) == {"sha256": pair.sha256, "offset": 0}


async def test_an_interrupted_fetch_resumes_and_only_the_rest_crosses(
    pair: Pair, tmp_path: Path
) -> None:
    dest = tmp_path / "mine" / "model.gguf"
    part = dest.with_name("model.gguf.part")
    half = SIZE // 2 + 7
    pair.handler = answering(head(SIZE) + pair.data[:half])  # then the stream ends
    with pytest.raises(TransferInterrupted, match=f"ended at {half} of {SIZE}"):
        await fetch_model(pair.open, pair.sha256, dest)
    assert part.stat().st_size == half and not dest.exists()

    pair.handler = None
    await fetch_model(pair.open, pair.sha256, dest, expected_size=SIZE)
    assert dest.read_bytes() == pair.data and not part.exists()
    assert json.loads(pair.requests[-1])["offset"] == half
    assert pair.server.sent_bytes == SIZE - half  # only the rest crossed


async def test_a_cancelled_fetch_keeps_what_it_wrote(pair: Pair, tmp_path: Path) -> None:
    dest = tmp_path / "model.gguf"
    part = tmp_path / "model.gguf.part"
    started = asyncio.Event()

    def progress(have: int, _total: int) -> None:
        if have > 0:
            started.set()

    task = asyncio.ensure_future(fetch_model(pair.open, pair.sha256, dest, progress=progress))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    have = part.stat().st_size
    assert have > 0 and part.read_bytes() == pair.data[:have]
    await fetch_model(pair.open, pair.sha256, dest)
    assert dest.read_bytes() == pair.data


async def test_a_file_the_holder_does_not_hold_is_refused_with_a_reason(
    pair: Pair, tmp_path: Path
) -> None:
    other = hashlib.sha256(b"another model").hexdigest()
    with pytest.raises(PeerRefused, match=f"holds no model file with sha256 {other}"):
        await fetch_model(pair.open, other, tmp_path / "x.gguf")
    assert pair.server.sent_bytes == 0
    assert not (tmp_path / "x.gguf").exists()


async def test_a_busy_holder_refuses(pair: Pair, tmp_path: Path) -> None:
    pair.server = FileServer(lambda _s: None, max_serving=0)
    with pytest.raises(PeerRefused, match="busy"):
        await fetch_model(pair.open, pair.sha256, tmp_path / "x.gguf")


async def test_a_corrupt_partial_file_fails_verification_and_is_deleted(
    pair: Pair, tmp_path: Path
) -> None:
    dest = tmp_path / "model.gguf"
    part = tmp_path / "model.gguf.part"
    part.write_bytes(b"\xff" * 1000)  # not the file's first 1000 bytes
    with pytest.raises(TransferError, match="corrupt.*partial file was deleted"):
        await fetch_model(pair.open, pair.sha256, dest, expected_size=SIZE)
    assert not part.exists() and not dest.exists()
    assert pair.server.sent_bytes == SIZE - 1000
    await fetch_model(pair.open, pair.sha256, dest, expected_size=SIZE)  # from scratch
    assert dest.read_bytes() == pair.data


async def test_a_partial_file_longer_than_the_file_starts_over(pair: Pair, tmp_path: Path) -> None:
    dest = tmp_path / "model.gguf"
    part = tmp_path / "model.gguf.part"
    part.write_bytes(pair.data + b"extra")
    with pytest.raises(TransferInterrupted, match="starting over"):
        await fetch_model(pair.open, pair.sha256, dest)  # no expected size: the holder's says
    assert part.stat().st_size == 0
    await fetch_model(pair.open, pair.sha256, dest)
    assert dest.read_bytes() == pair.data


@pytest.mark.parametrize(
    ("answer", "expected_size", "why"),
    [
        (frame(MessageType.MODEL_FILE, b'{"size":-1}'), None, "invalid.*outside"),
        (frame(MessageType.MODEL_FILE, b'{"size":4611686018427387904}'), None, "outside"),
        (frame(MessageType.MODEL_FILE, b'{"size":"9"}'), None, "integer"),
        (head(1 << 59), None, "needs .* GB more"),  # more than any disk here
        (head(SIZE + 1), SIZE, "offers"),  # not the size the holder announced in gossip
        (head(10) + bytes(20), None, "more than the 10 B"),
        (frame(MessageType.BODY, b"x" * 10), None, "invalid: BODY"),
        (frame(MessageType.MODEL_FILE, b"x" * 5000), None, "exceeds limit"),
        (frame(0x99, b"{}"), None, "unknown frame type"),  # type: ignore[arg-type]
    ],
    ids=["negative", "huge", "string", "beyond-disk", "wrong-size", "too-many-bytes", "body",
         "big-head", "unknown-type"],
)
async def test_a_hostile_answer_is_refused(
    pair: Pair, tmp_path: Path, answer: bytes, expected_size: int | None, why: str
) -> None:
    pair.handler = answering(answer)
    dest = tmp_path / "model.gguf"
    with pytest.raises(TransferError, match=why):
        await fetch_model(pair.open, pair.sha256, dest, expected_size=expected_size)
    assert not dest.exists()
    part = tmp_path / "model.gguf.part"
    assert not part.exists() or part.stat().st_size <= 20


async def test_an_error_frame_is_the_peer_refusing(pair: Pair, tmp_path: Path) -> None:
    pair.handler = answering(frame(MessageType.ERROR, b'{"reason":"disk on fire"}'))
    with pytest.raises(PeerRefused, match="disk on fire"):
        await fetch_model(pair.open, pair.sha256, tmp_path / "m.gguf")


async def test_a_bad_request_is_refused_by_the_holder(pair: Pair) -> None:
    reader, writer = await pair.fetcher.open_stream(
        pair.holder_id, MessageType.FETCH_MODEL, b'{"sha256":"../../etc/passwd","offset":0}'
    )
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert b"bad request" in answer and b"sha256" in answer
    assert pair.server.sent_bytes == 0


async def test_the_fetcher_tries_another_holder_and_reports_progress(
    pair: Pair, tmp_path: Path
) -> None:
    async def open_stream(peer: str, payload: bytes) -> tuple[asyncio.StreamReader, Any]:
        if peer == "gone":
            raise ConnectionResetError("no connection")
        return await pair.open(payload)

    changes: list[Any] = []
    done: list[FetchTarget] = []
    fetcher = ModelFetcher(open_stream, on_change=lambda: changes.append(fetcher.status),
                           on_done=done.append, retry_delays=(0.01,))  # fmt: skip
    target = FetchTarget("m", pair.sha256, SIZE, tmp_path / "m.gguf", ("gone", "good"))
    fetcher.want("m", target)
    fetcher.want("m", target)  # the same target: the same fetch goes on
    async with asyncio.timeout(20):
        while not done:  # noqa: ASYNC110 - the callback is the event
            await asyncio.sleep(0.01)
    assert done == [target] and (tmp_path / "m.gguf").read_bytes() == pair.data
    states = [(c.state, c.source) for c in changes if c is not None]
    assert ("retrying", "gone") in states and ("done", "good") in states
    assert fetcher.status is not None and fetcher.status.as_json()["from"] == "good"
    fetcher.want("m", None)  # resolved here now: the finished fetch stays visible
    assert fetcher.status is not None and fetcher.status.state == "done"
    fetcher.want("other", None)  # the mesh moved on
    assert fetcher.status is None
    await fetcher.close()


async def test_the_fetcher_stops_when_the_target_goes(pair: Pair, tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def slow(peer: str, payload: bytes) -> tuple[asyncio.StreamReader, Any]:
        await gate.wait()
        return await pair.open(payload)

    fetcher = ModelFetcher(slow, on_change=lambda: None, on_done=lambda _t: None)
    fetcher.want("m", FetchTarget("m", pair.sha256, SIZE, tmp_path / "m.gguf", ("h",)))
    await asyncio.sleep(0.05)
    fetcher.want(None, None)
    assert fetcher.status is None
    gate.set()
    await fetcher.close()
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------ what to fetch, where it lands


def info(node_id: str, *, model: str | None = "m", sha: str | None = "a" * 64,
         has_model: bool = True, size: int = 100) -> NodeInfo:  # fmt: skip
    return NodeInfo(node_id=node_id, name=node_id, role="member", memory_bytes=1, addrs=(),
                    http_port=0, model=model, has_model=has_model, version="t",
                    model_bytes=size if has_model else 0, model_sha256=sha)  # fmt: skip


def test_fetch_target_picks_holders_of_one_digest(tmp_path: Path) -> None:
    me = info("0" * 16, has_model=False, sha=None)
    members = [me, info("1" * 16, sha="b" * 64), info("2" * 16), info("3" * 16),
               info("4" * 16, has_model=False, sha=None), info("5" * 16, model="other"),
               info("6" * 16, sha=None)]  # fmt: skip
    target = fetch_target("m", members, tmp_path, me.node_id)
    assert isinstance(target, FetchTarget)
    # most holders have "a…"; not indexed yet, other models and non-holders are no source
    assert target.sha256 == "a" * 64 and target.holders == ("2" * 16, "3" * 16)
    assert target.dest == tmp_path / "m.gguf" and target.size == 100
    # the host's digest wins, and the host comes first
    target = fetch_target("m", members, tmp_path, me.node_id, prefer="1" * 16)
    assert isinstance(target, FetchTarget) and target.holders == ("1" * 16,)
    target = fetch_target("m", members, tmp_path, me.node_id, prefer="3" * 16)
    assert isinstance(target, FetchTarget) and target.holders == ("3" * 16, "2" * 16)
    assert fetch_target("m", [me, info("4" * 16, has_model=False)], tmp_path, me.node_id) is None


def test_fetch_target_says_why_not(tmp_path: Path) -> None:
    holder = [info("1" * 16, model="qwen2.5-7b")]
    split = fetch_target("qwen2.5-7b", holder, tmp_path, "0" * 16)
    assert isinstance(split, Unfetchable) and "split" in split.reason
    # the catalog pins smollm2's sha256: a peer's other file under that name is no source
    wrong = fetch_target("smollm2-135m", [info("1" * 16, model="smollm2-135m")], tmp_path, "x")
    assert isinstance(wrong, Unfetchable) and "catalog's sha256" in wrong.reason
    (tmp_path / "m.gguf").write_bytes(b"junk")  # never overwritten
    there = fetch_target("m", [info("1" * 16)], tmp_path, "0" * 16)
    assert isinstance(there, Unfetchable) and "not overwriting" in there.reason


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("smol", "smol.gguf"),
        ("smol.gguf", "smol.gguf"),
        ("qwen2.5-0.5b", "qwen2.5-0.5b-instruct-q4_k_m.gguf"),  # the catalog's download name
        ("hf://owner/repo@v1/sub/dir/x.Q4.gguf", "x.Q4.gguf"),  # the download's name
        ("/elsewhere/on/another/machine/x.gguf", "x.gguf"),
    ],
)
def test_a_copy_lands_where_resolve_finds_it(tmp_path: Path, ref: str, name: str) -> None:
    dest = local_copy_path(ref, tmp_path)
    assert dest == tmp_path / name
    with contextlib.suppress(ModelError):  # a name or a path that is not here at all
        assert resolve_model(ref, tmp_path).path is None  # catalog, hf://: "download it"
    tiny_gguf(dest)
    assert resolve_model(ref, tmp_path).path == dest.resolve()


def test_split_models_and_bad_names_have_no_copy_path(tmp_path: Path) -> None:
    for ref in ("qwen2.5-7b", "hf://o/r/x-00001-of-00002.gguf", "/a/x-00001-of-00003.gguf"):
        with pytest.raises(ModelError, match="split"):
            local_copy_path(ref, tmp_path)
    for ref in ("", "a b", "/a/ b.gguf"):
        with pytest.raises(ModelError):
            local_copy_path(ref, tmp_path)


def test_a_missing_path_is_not_found_without_a_copy(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("/nowhere/x.gguf", tmp_path)
    # the fallback is models_dir/<base name> only
    (tmp_path / "sub").mkdir()
    tiny_gguf(tmp_path / "sub" / "x.gguf")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("/nowhere/x.gguf", tmp_path)
