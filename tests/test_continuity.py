"""Answers that outlive their upstream: the real gateway in front of an engine that dies.

The engine is a real aiohttp server that speaks like llama-server (assistant
prefill echoed at the start of the first content chunk, one token per chunk)
and can be told to die mid-answer (the connection is dropped) or to be
unavailable (503) for a number of requests. The gateways are the real app,
on the host (engine on HTTP) and on a worker (the host over a Task stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gatewaymesh import start, task_server
from test_gateway_core import TOKEN, Backend

from mesh_inference.api.gateway import create_app

pytestmark = pytest.mark.timeout(60)

WORDS = [f" w{i}" for i in range(40)]
FULL = "".join(WORDS)
ASK = {"messages": [{"role": "user", "content": "count"}], "temperature": 0, "max_tokens": 30}


class Engine:
    """A deterministic llama-server stand-in; ``plan`` says how each next request fares."""

    def __init__(self) -> None:
        self.plan: list[tuple[str, int]] = []  # ("die", after n tokens) | ("503", 0)
        self.requests: list[dict[str, Any]] = []
        self.templated: list[Any] = []  # /apply-template calls: the start of a cache replay

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/apply-template", self.apply_template)
        return app

    async def apply_template(self, request: web.Request) -> web.Response:
        self.templated.append((await request.json())["messages"])
        return web.json_response({"error": "no tokenizer here"}, status=501)  # replay skipped

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        fate, after = self.plan.pop(0) if self.plan else ("ok", 0)
        if fate == "503":
            return web.json_response({"error": {"message": "Loading model", "code": 503}},
                                     status=503)
        msgs = body["messages"]
        prefix = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else ""
        k = next(i for i in range(len(WORDS) + 1) if "".join(WORDS[:i]) == prefix)
        todo = WORDS[k : k + body.get("max_tokens", 1000)]
        if not body.get("stream"):
            if fate == "die":
                assert request.transport is not None
                request.transport.close()  # dies before answering
                await asyncio.sleep(1)
            return web.json_response({"id": "cmpl-x", "object": "chat.completion",
                                      "choices": [{"index": 0, "finish_reason": "length",
                                                   "message": {"role": "assistant",
                                                               "content": "".join(todo)}}]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        ident = f"chatcmpl-{len(self.requests)}"

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {"id": ident, "created": len(self.requests), "model": "m",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        await send({"role": "assistant", "content": None})
        for i, word in enumerate(todo):
            if fate == "die" and i == after:
                await resp.write(b'data: {"choices": [{"ind')  # a torn event, then gone
                assert request.transport is not None
                request.transport.close()
                return resp
            await send({"content": (prefix + word) if i == 0 else word})
            await asyncio.sleep(0.001)
        await send({}, "length")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def mesh() -> AsyncIterator[dict[str, Any]]:
    engine = Engine()
    r1, engine_url = await start(engine.app())
    host_backend = Backend(engine_url, host=True)
    r2, host_url = await start(create_app(host_backend, console_dir=None, console_token=TOKEN,
                                          request_wait=5.0))
    async with task_server(host_backend) as opener:
        r3, worker_url = await start(create_app(Backend(None, host=False, opener=opener),
                                                console_dir=None, console_token=TOKEN,
                                                request_wait=5.0))
        yield {"host": host_url, "worker": worker_url, "engine": engine, "backend": host_backend}
    for r in (r3, r2, r1):
        await r.cleanup()


async def stream(url: str, body: dict[str, Any]) -> tuple[str, list[Any], list[bytes]]:
    """(text, parsed data events, comment lines) of one streamed chat answer."""
    text, evs, comments = "", [], []
    async with aiohttp.ClientSession() as s, s.post(
        f"{url}/v1/chat/completions", json={**body, "stream": True}
    ) as r:
        assert r.status == 200
        raw = await r.read()
    for ev in raw.split(b"\n\n"):
        if ev.startswith(b":"):
            comments.append(ev)
        elif ev.startswith(b"data: "):
            data = ev[6:]
            evs.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    for e in evs:
        if isinstance(e, dict) and "choices" in e:
            text += e["choices"][0]["delta"].get("content") or ""
    return text, evs, comments


@pytest.mark.parametrize("where", ["host", "worker"])
async def test_a_stream_whose_engine_dies_twice_completes_as_one(
    mesh: dict[str, Any], where: str
) -> None:
    engine: Engine = mesh["engine"]
    engine.plan = [("die", 7), ("503", 0), ("503", 0), ("die", 5)]
    text, evs, comments = await stream(mesh[where], ASK)
    assert text == "".join(WORDS[:30])  # no gap, no repeat
    assert evs[-1] == "[DONE]" and evs.count("[DONE]") == 1
    assert not any(isinstance(e, dict) and "error" in e for e in evs)
    assert {e["id"] for e in evs if isinstance(e, dict)} == {"chatcmpl-1"}  # one stream
    assert sum(1 for e in evs if isinstance(e, dict) and "role" in e["choices"][0]["delta"]) == 1
    assert comments  # keep-alives while the engine was away
    # The continuations asked for the rest only, with the text so far as the assistant's turn.
    second, last = engine.requests[1], engine.requests[-1]
    assert second["messages"][-1] == {"role": "assistant", "content": "".join(WORDS[:7])}
    assert second["max_tokens"] == 23
    assert last["messages"][-1]["content"] == "".join(WORDS[:12]) and last["max_tokens"] == 18
    # Every continuation attempt asked the engine's host to rebuild the cache first.
    assert engine.templated == [ASK["messages"]] * (len(engine.requests) - 1)


async def test_a_client_cannot_ask_for_a_cache_replay(mesh: dict[str, Any]) -> None:
    engine: Engine = mesh["engine"]
    body = {**ASK, "messages": [*ASK["messages"], {"role": "assistant", "content": " w0"}]}
    for where in ("host", "worker"):
        async with aiohttp.ClientSession() as s, s.post(
            f"{mesh[where]}/v1/chat/completions", json=body, headers={"x-mesh-replay": "1"}
        ) as r:
            assert r.status == 200
    assert engine.templated == []  # the header is the nodes' own, dropped at the edge


async def test_a_stream_ends_with_an_error_when_the_mesh_does_not_come_back(
    mesh: dict[str, Any],
) -> None:
    engine: Engine = mesh["engine"]
    engine.plan = [("die", 4)] + [("503", 0)] * 1000
    text, evs, comments = await stream(mesh["worker"], ASK)
    assert text == "".join(WORDS[:4])
    assert "[DONE]" not in evs  # never mistaken for a finished answer
    assert isinstance(evs[-1], dict) and evs[-1]["error"]["code"] == "stream_broken"
    assert "did not serve again" in evs[-1]["error"]["message"] and comments


async def test_a_request_waits_for_the_engine_instead_of_a_503(mesh: dict[str, Any]) -> None:
    backend: Backend = mesh["backend"]
    url, backend.engine = backend.engine, None  # relaunching: no engine

    async def back_soon() -> None:
        await asyncio.sleep(0.6)
        backend.engine = url

    task = asyncio.create_task(back_soon())
    async with aiohttp.ClientSession() as s, s.post(
        f"{mesh['worker']}/v1/chat/completions", json=ASK
    ) as r:
        assert r.status == 200
        body = await r.json()
    await task
    assert body["choices"][0]["message"]["content"] == "".join(WORDS[:30])


async def test_a_non_streamed_answer_lost_on_the_way_is_asked_again_and_given_once(
    mesh: dict[str, Any],
) -> None:
    engine: Engine = mesh["engine"]
    engine.plan = [("die", 0)]
    async with aiohttp.ClientSession() as s, s.post(
        f"{mesh['host']}/v1/chat/completions", json=ASK
    ) as r:
        assert r.status == 200
        body = await r.json()
    assert body["choices"][0]["message"]["content"] == "".join(WORDS[:30])
    assert len(engine.requests) == 2
