"""Answers that outlive the engine, a worker or the host: wait, retry, continue.

Public API::

    resp = await complete_with_retries(attempt, kind, request)   # attempt(body) -> response

``attempt`` sends one request body to wherever the mesh serves now (the
local engine on the host, else the host over a Task stream) and returns its
response. Around it:

- **Before an answer starts** (502/503/504 from our own gateway or the
  engine: no host yet, engine relaunching, host unreachable), the request
  waits and retries, bounded by ``wait`` seconds (about 30), instead of
  failing at once.
- **Non-streamed answers** are read whole before the client sees anything,
  so one that breaks is retried and the client gets exactly one answer.
- **Streamed answers** go through a :class:`~mesh_inference.core.resume.StreamJournal`.
  If the upstream breaks (an exception, or an end without ``[DONE]``), the
  client's stream stays open with SSE comments as keep-alives while the
  mesh re-forms, then continues with the journal's continuation request
  (the text so far as the start of the assistant's turn). If that cannot
  happen within ``wait`` seconds, the stream ends with an OpenAI-style error
  event: a broken upstream never looks like a finished answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from mesh_inference.core.resume import StreamJournal
from mesh_inference.net.proxy import ProxiedResponse, ProxyError

log = logging.getLogger(__name__)

WAIT = 30.0  # how long a request waits for the mesh to serve again
RETRY_EVERY = 0.5
KEEPALIVE = b": mesh-inference: waiting for the mesh to serve again\n\n"
TRANSIENT = frozenset({502, 503, 504})
BROKEN = (ProxyError, aiohttp.ClientError, ConnectionError, TimeoutError, OSError)

# attempt(body, continuation): send one request; ``continuation`` marks a request that
# continues a broken answer (the engine's host rebuilds its cache first: api/replay.py).
Attempt = Callable[[bytes, bool], Awaitable[ProxiedResponse]]


async def _close(resp: ProxiedResponse) -> None:
    with contextlib.suppress(Exception):
        await resp.aclose()


async def _read_all(resp: ProxiedResponse) -> bytes:
    parts = [chunk async for chunk in resp.body_iter]
    return b"".join(parts)


def _unavailable(message: str) -> ProxiedResponse:
    err = {"error": {"message": message, "type": "service_unavailable", "code": "no_host"}}
    return ProxiedResponse.of_bytes(
        503, [("content-type", "application/json")], json.dumps(err).encode()
    )


def _is_sse(resp: ProxiedResponse) -> bool:
    return any(k == "content-type" and v.startswith("text/event-stream") for k, v in resp.headers)


async def _try(attempt: Attempt, body: bytes, continuation: bool = False) -> ProxiedResponse | None:
    """One attempt; None if the mesh does not serve right now (worth retrying)."""
    try:
        resp = await attempt(body, continuation)
    except BROKEN as exc:
        log.info("request attempt failed: %s", exc)
        return None
    if resp.status in TRANSIENT:
        await _close(resp)
        return None
    return resp


async def complete_with_retries(
    attempt: Attempt,
    kind: str,
    request: dict[str, Any],
    *,
    wait: float = WAIT,
    retry_every: float = RETRY_EVERY,
) -> ProxiedResponse:
    """Serve ``request`` through ``attempt``, riding out failures (see the module doc)."""
    loop = asyncio.get_running_loop()
    body = json.dumps(request).encode()
    deadline = loop.time() + wait
    streamed = request.get("stream") is True
    while True:
        resp = await _try(attempt, body)
        if resp is not None and not streamed:
            try:
                data = await _read_all(resp)
            except BROKEN as exc:
                log.info("answer broke while being read: %s", exc)
                resp = None
            else:
                return ProxiedResponse.of_bytes(resp.status, resp.headers, data)
        if resp is not None:
            if resp.status != 200 or not _is_sse(resp):
                return resp
            journal = StreamJournal(kind, request)
            return ProxiedResponse(
                resp.status, resp.headers,
                _continued(attempt, journal, resp, wait=wait, retry_every=retry_every),
            )
        if loop.time() >= deadline:
            # One last try, answered as it comes: the client sees why the mesh cannot serve.
            try:
                return await attempt(body, False)
            except BROKEN as exc:
                return _unavailable(f"the mesh cannot serve this request: {exc}")
        await asyncio.sleep(retry_every)


async def _continued(
    attempt: Attempt,
    journal: StreamJournal,
    resp: ProxiedResponse,
    *,
    wait: float,
    retry_every: float,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    current: ProxiedResponse | None = resp
    while current is not None:
        reason = "the answer ended before it was complete"
        try:
            async for chunk in current.body_iter:
                out = journal.feed(chunk)
                if out:
                    yield out
            if journal.complete:
                return
        except BROKEN as exc:
            reason = f"{exc}" or type(exc).__name__
        finally:
            await _close(current)
        current = None
        if journal.finished:
            yield b"data: [DONE]\n\n"  # the end arrived, only the terminator was lost
            return
        request = journal.continuation()
        if request is None:
            yield journal.error_event(f"the stream broke and cannot be continued: {reason}")
            return
        log.warning("stream broke after %d tokens (%s); continuing it", journal.tokens, reason)
        body = json.dumps(request).encode()
        replay = bool(journal.text)  # something to rebuild in the engine's cache
        deadline = loop.time() + wait
        while current is None:
            yield KEEPALIVE
            if loop.time() >= deadline:
                yield journal.error_event(
                    f"the stream broke ({reason}) and the mesh did not serve again "
                    f"within {wait:.0f} s"
                )
                return
            candidate = await _try(attempt, body, replay)
            if candidate is None:
                await asyncio.sleep(retry_every)
            elif candidate.status != 200 or not _is_sse(candidate):
                try:
                    detail = (await _read_all(candidate))[:300].decode("utf-8", "replace")
                except BROKEN as exc:
                    detail = str(exc)
                yield journal.error_event(
                    f"the stream broke ({reason}); continuing it failed: "
                    f"{candidate.status} {detail}"
                )
                return
            else:
                journal.begin_continuation()
                current = candidate
