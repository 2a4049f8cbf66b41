"""api/replay.py against a real HTTP stand-in for llama-server's native endpoints."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from gatewaymesh import start

from mesh_inference.api.replay import replay_into_cache

WORDS = [f" w{i}" for i in range(20)]
REQUEST = {"messages": [{"role": "user", "content": "count"},
                        {"role": "assistant", "content": "".join(WORDS)}]}


def engine(step_delay: float) -> tuple[web.Application, list[list[int]]]:
    prompts: list[list[int]] = []

    async def apply_template(request: web.Request) -> web.Response:
        body = await request.json()
        assert body["messages"] == REQUEST["messages"][:1]  # the prompt without the answer
        return web.json_response({"prompt": "<user>count</user><assistant>"})

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        n = 7 if body["add_special"] else len(WORDS)  # prompt: 7 tokens; answer: one per word
        return web.json_response({"tokens": list(range(1000, 1000 + n))})

    async def completion(request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        assert body["n_predict"] == 0 and body["cache_prompt"] is True
        prompts.append(body["prompt"])
        await asyncio.sleep(step_delay)
        return web.json_response({"content": ""})

    app = web.Application()
    app.router.add_post("/apply-template", apply_template)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/completion", completion)
    return app, prompts


async def test_the_prefix_is_replayed_one_token_per_step() -> None:
    app, prompts = engine(0.0)
    runner, url = await start(app)
    try:
        async with aiohttp.ClientSession() as s:
            assert await replay_into_cache(s, url, REQUEST)
    finally:
        await runner.cleanup()
    # The prompt alone (one batch, as generation began), then one more token per call.
    assert [len(p) for p in prompts] == list(range(7, 7 + len(WORDS) + 1))
    assert all(prompts[i] == prompts[-1][: len(prompts[i])] for i in range(len(prompts)))


async def test_a_busy_engine_gets_a_bounded_replay() -> None:
    app, prompts = engine(0.05)  # each step waits, as behind other requests' batches
    runner, url = await start(app)
    try:
        async with aiohttp.ClientSession() as s:
            assert not await replay_into_cache(s, url, REQUEST, budget=0.2)
    finally:
        await runner.cleanup()
    assert 1 <= len(prompts) < len(WORDS) // 2  # stopped well before the end


async def test_no_assistant_text_means_nothing_to_replay() -> None:
    app, prompts = engine(0.0)
    runner, url = await start(app)
    try:
        async with aiohttp.ClientSession() as s:
            assert not await replay_into_cache(s, url, {"messages": REQUEST["messages"][:1]})
            assert not await replay_into_cache(s, url + "/nowhere", REQUEST)  # 404s: skipped
    finally:
        await runner.cleanup()
    assert prompts == []
