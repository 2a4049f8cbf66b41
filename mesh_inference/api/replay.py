"""Exact continuations: rebuild a dead engine's KV cache the way generation built it.

Public API::

    await replay_into_cache(session, engine_url, request)   # before a continuation request

Why: a continuation asks the (new) engine for the rest of an answer with the
text so far as the start of the assistant's turn. A fresh llama-server would
evaluate prompt + text so far as one batch, and batched evaluation is not
bit-identical to the token-by-token decoding that produced the text: at
temperature 0 the answers then drift apart after a hundred tokens or so
(measured on SmolLM2: a 200-token story diverged at character 494–747 of
850 when cut at token 30, 90 or 120). Replaying the cache the way the
first engine built it -- the prompt as one batch, then each generated token
alone -- makes the continuation exact (the same cuts: 850 of 850 equal),
for ~10 ms per token of replay on this machine.

How: llama-server's ``/apply-template`` and ``/tokenize`` give the prompt's
token ids and the text's; ``/completion`` with ``n_predict: 0`` and
``cache_prompt`` evaluates and keeps them, one more token per call; the
continuation request that follows finds all of it cached. Best effort: an
engine without these endpoints, a text too long to replay, or any error
leaves the cache as it is (the continuation is then near-exact).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

HEADER = "x-mesh-replay"  # set on continuation requests between nodes, never by clients
MAX_REPLAY_TOKENS = 1024  # beyond this, a batched prefill (faster, near-exact)
# Wall-clock budget: on an engine busy with other requests each replay step waits for
# a batch slot (~3 s per token in the soak), and a step batched with other sequences is
# not bit-exact anyway. Past the budget the rest is a batched prefill (near-exact).
REPLAY_BUDGET_S = 5.0
_TIMEOUT = aiohttp.ClientTimeout(total=30)


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body, timeout=_TIMEOUT) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url.rsplit('/', 1)[-1]}: HTTP {resp.status}")
        return await resp.json()


async def replay_into_cache(
    session: aiohttp.ClientSession,
    engine_url: str,
    request: dict[str, Any],
    *,
    budget: float = REPLAY_BUDGET_S,
) -> bool:
    """Evaluate the continuation's prefix into the engine's cache token by token.

    ``request``: a chat continuation (its last message is the assistant's text so
    far). True if the replay ran; False if there was nothing to do or it failed.
    """
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    last = messages[-1]
    if not (isinstance(last, dict) and last.get("role") == "assistant"
            and isinstance(last.get("content"), str) and last["content"]):
        return False
    try:
        templated = await _post(session, engine_url + "/apply-template",
                                {"messages": messages[:-1]})
        prompt = templated["prompt"]
        ptoks = (await _post(session, engine_url + "/tokenize", {
            "content": prompt, "add_special": True, "parse_special": True}))["tokens"]
        gtoks = (await _post(session, engine_url + "/tokenize", {
            "content": last["content"], "add_special": False, "parse_special": False}))["tokens"]
        if not (isinstance(ptoks, list) and isinstance(gtoks, list)):
            return False
        if len(gtoks) > MAX_REPLAY_TOKENS:
            log.info("continuation: %d tokens is too long to replay; batched prefill",
                     len(gtoks))
            return False
        # The prompt as the first engine took it (one batch), then one token per step.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        for n in range(len(gtoks) + 1):
            if loop.time() > deadline:
                log.info("continuation: replay stopped after %d of %d tokens (over %.0f s: "
                         "the engine is busy); batched prefill for the rest",
                         n - 1, len(gtoks), budget)  # fmt: skip
                return False
            await _post(session, engine_url + "/completion",
                        {"prompt": ptoks + gtoks[:n], "n_predict": 0, "cache_prompt": True})
    except (aiohttp.ClientError, TimeoutError, RuntimeError, KeyError, TypeError,
            ValueError) as exc:
        log.info("continuation: cache replay skipped: %s", exc)
        return False
    log.info("continuation: replayed %d prompt + %d answer tokens", len(ptoks), len(gtoks))
    return True
