"""Gateway and HTTP-over-stream proxy on real sockets (127.0.0.1, port 0).

The upstream is a real aiohttp server that speaks like llama-server; the
"host" of a non-host gateway is served by the OpenAI core behind the DCF
proxy over a real TCP stream pair (same interface as a QUIC stream), exactly
as the node serves a peer's Task: no HTTP gateway in between.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gatewaymesh import start, task_server

from mesh_inference.api.gateway import NoHostError, create_app
from mesh_inference.core.dcf import Frame, FrameDecoder, MessageType
from mesh_inference.core.messages import TaskHead
from mesh_inference.net.proxy import (
    MAX_BODY,
    ProxiedResponse,
    ProxyError,
    forward_request,
    serve_task,
)

pytestmark = pytest.mark.timeout(60)
TOKEN = "t" * 43  # a console token; these tests do not log in


def gateway(backend: Any, request_wait: float = 0.0) -> web.Application:
    # No waiting by default: most tests here look at the answer a mesh without a host
    # or an engine gives; the waiting itself has tests of its own.
    return create_app(backend, console_dir=None, console_token=TOKEN, request_wait=request_wait)


def fake_llama() -> tuple[web.Application, asyncio.Event]:
    """Speaks like llama-server: JSON answers, or SSE chunks then [DONE]."""
    release = asyncio.Event()
    app = web.Application()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "model": "m", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Paris."},
                 "finish_reason": "stop"}]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(["The ", "capital ", "is ", "Paris."]):
            chunk = {"object": "chat.completion.chunk", "model": "m", "choices": [
                {"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if i == 0 and body.get("hold"):
                await release.wait()  # the client must see chunk 0 before we go on
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app.router.add_post("/v1/chat/completions", chat)
    return app, release


class Backend:
    def __init__(self, engine: str | None, host: bool,
                 opener: Callable[[], Awaitable[tuple[Any, Any]]] | None = None) -> None:
        self.engine, self.host, self.opener = engine, host, opener
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def status(self) -> dict[str, Any]:
        return {"engine": {"state": "ready" if self.engine else "starting"},
                "ready": self.engine is not None, "node": {"id": "x"}}

    def engine_url(self) -> str | None:
        return self.engine

    def is_host(self) -> bool:
        return self.host

    def served_model(self) -> str | None:
        return "smollm2-135m"

    async def open_host_stream(self) -> tuple[Any, Any]:
        if self.opener is None:
            raise NoHostError("no host")
        return await self.opener()

    async def _sub(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "status", self.status()
        while True:
            yield await self.queue.get()

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self._sub()


@pytest.fixture
async def mesh() -> AsyncIterator[dict[str, Any]]:
    """upstream (fake llama) ← host gateway; upstream ← Task handler ← TCP ← worker gateway."""
    llama_app, release = fake_llama()
    r1, llama_url = await start(llama_app)
    host_backend = Backend(llama_url, host=True)
    r2, host_url = await start(gateway(host_backend))
    async with task_server(host_backend) as opener:
        r3, worker_url = await start(gateway(Backend(None, host=False, opener=opener)))
        yield {"llama": llama_url, "host": host_url, "worker": worker_url, "release": release,
               "host_backend": host_backend}
    for r in (r3, r2, r1):
        await r.cleanup()


CHAT = {"messages": [{"role": "user", "content": "capital of France?"}]}


@pytest.mark.parametrize("where", ["host", "worker"])
async def test_non_streamed_answer(mesh: dict[str, Any], where: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        f"{mesh[where]}/v1/chat/completions", json=CHAT
    ) as r:
        assert r.status == 200
        assert (await r.json())["choices"][0]["message"]["content"] == "Paris."


@pytest.mark.parametrize("where", ["host", "worker"])
async def test_stream_arrives_chunk_by_chunk(mesh: dict[str, Any], where: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        f"{mesh[where]}/v1/chat/completions", json={**CHAT, "stream": True, "hold": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        assert b"The " in first  # arrived while the upstream still holds the rest
        mesh["release"].set()
        rest = (await r.content.read()).decode()
    assert "Paris." in rest and rest.rstrip().endswith("data: [DONE]")


async def test_openai_client_through_worker(mesh: dict[str, Any]) -> None:
    openai = pytest.importorskip("openai")
    cli = openai.AsyncOpenAI(base_url=f"{mesh['worker']}/v1", api_key="x", max_retries=0)
    out = await cli.chat.completions.create(model="smollm2-135m", messages=CHAT["messages"])
    assert out.choices[0].message.content == "Paris."
    mesh["release"].set()
    parts = [c.choices[0].delta.content async for c in await cli.chat.completions.create(
        model="smollm2-135m", messages=CHAT["messages"], stream=True) if c.choices]
    assert "".join(p or "" for p in parts) == "The capital is Paris."
    await cli.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{nope", None),
        (b"[1,2]", None),
        (json.dumps({"messages": []}).encode(), "messages"),
        (json.dumps({"messages": [{"content": "x"}]}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages"),
        (json.dumps({**CHAT, "stream": "yes"}).encode(), "stream"),
        (json.dumps({**CHAT, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({**CHAT, "temperature": -1}).encode(), "temperature"),
        (json.dumps({**CHAT, "model": 7}).encode(), "model"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', None),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}', None),
        (b'{"messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 100
         + b"]" * 100 + b"}", None),
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ],
)
@pytest.mark.parametrize("where", ["host", "worker"])
async def test_bad_requests_are_400(mesh: dict[str, Any], where: str, body: bytes,
                                    param: str | None) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        f"{mesh[where]}/v1/chat/completions", data=body,
        headers={"content-type": "application/json"},
    ) as r:
        assert r.status == 400
        err = (await r.json())["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param


async def test_completions_validation(mesh: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        f"{mesh['host']}/v1/completions", json={"prompt": 3}
    ) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"


async def test_host_without_engine_is_503(mesh: dict[str, Any]) -> None:
    mesh["host_backend"].engine = None
    for where in ("host", "worker"):
        async with aiohttp.ClientSession() as s, s.post(
            f"{mesh[where]}/v1/chat/completions", json=CHAT
        ) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "engine_not_ready"


async def test_no_host_is_503_and_loop_guard() -> None:
    runner, url = await start(gateway(Backend(None, host=False)))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "no_host"
            async with s.post(f"{url}/v1/chat/completions", json=CHAT,
                              headers={"x-mesh-hops": "1"}) as r:
                assert r.status == 503 and "not the host" in (await r.json())["error"]["message"]
    finally:
        await runner.cleanup()


async def test_status_health_models_and_events(mesh: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{mesh['host']}/health") as r:
            assert await r.json() == {"status": "ok", "ready": True}
        async with s.get(f"{mesh['worker']}/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "smollm2-135m"
        async with s.get(f"{mesh['host']}/api/status") as r:
            assert (await r.json())["engine"]["state"] == "ready"
        async with s.get(f"{mesh['host']}/api/events") as r:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert first.startswith(b"event: status\ndata: ")
            await mesh["host_backend"].queue.put(("download", {"name": "m", "done": True}))
            second = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert second.startswith(b"event: download\n")
            assert json.loads(second.split(b"data: ", 1)[1]) == {"name": "m", "done": True}


# ---------------------------------------------------------------- proxy alone
@pytest.fixture
async def proxy_pair() -> AsyncIterator[Callable[[Any], Awaitable[tuple[Any, Any]]]]:
    servers = []

    async def make(handler: Any) -> tuple[Any, Any]:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_task(reader, writer, handler)

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        servers.append(server)
        return await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])

    yield make
    for s in servers:
        s.close()


async def _body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_proxy_round_trip_large_bodies(proxy_pair: Any) -> None:
    seen: list[tuple[TaskHead, int]] = []

    async def handler(head: TaskHead, body: bytes) -> ProxiedResponse:
        seen.append((head, len(body)))
        return ProxiedResponse(201, [("content-type", "application/octet-stream")],
                               _body(body[::-1]))

    reader, writer = await proxy_pair(handler)
    payload = bytes(range(256)) * 4096  # 1 MiB
    resp = await forward_request(reader, writer, method="POST", path="/v1/x",
                                 headers={"Content-Type": "a/b", "Cookie": "secret"},
                                 body=payload)
    got = b"".join([c async for c in resp.body_iter])
    assert resp.status == 201 and got == payload[::-1]
    head, n = seen[0]
    assert n == len(payload) and head.path == "/v1/x"
    assert dict(head.headers) == {"content-type": "a/b"}  # cookies never cross


async def test_proxy_body_limit_is_413(proxy_pair: Any) -> None:
    async def handler(head: TaskHead, body: bytes) -> ProxiedResponse:
        raise AssertionError("must not be called")

    reader, writer = await proxy_pair(handler)
    resp = await forward_request(reader, writer, method="POST", path="/", headers={},
                                 body=b"x" * (MAX_BODY + 1))
    assert resp.status == 413
    assert b"too large" in b"".join([c async for c in resp.body_iter])


async def test_proxy_garbage_answer_is_proxy_error() -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"\xee" * 40)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        with pytest.raises(ProxyError):
            await forward_request(r, w, method="POST", path="/", headers={}, body=b"{}")
    finally:
        server.close()


async def test_proxy_peer_closing_mid_stream_is_an_error(proxy_pair: Any) -> None:
    async def handler(head: TaskHead, body: bytes) -> ProxiedResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"one"
            raise ConnectionResetError("engine died")

        return ProxiedResponse(200, [], chunks())

    reader, writer = await proxy_pair(handler)
    resp = await forward_request(reader, writer, method="POST", path="/", headers={}, body=b"")
    got = []
    with pytest.raises(ProxyError):
        async for c in resp.body_iter:
            got.append(c)
    assert got == [b"one"]


async def test_server_rejects_a_stream_not_starting_with_task() -> None:
    out = bytearray()

    class W:
        def write(self, d: bytes) -> None:
            out.extend(d)

        async def drain(self) -> None: ...
        def write_eof(self) -> None: ...
        def close(self) -> None: ...

    reader = asyncio.StreamReader()
    from mesh_inference.core.dcf import encode_frame

    reader.feed_data(encode_frame(Frame(MessageType.BODY, 0, 0, b"x")))
    reader.feed_eof()

    async def handler(head: TaskHead, body: bytes) -> ProxiedResponse:
        raise AssertionError

    await serve_task(reader, W(), handler)
    frames = FrameDecoder().feed(bytes(out))
    assert frames[0].type == MessageType.ERROR
