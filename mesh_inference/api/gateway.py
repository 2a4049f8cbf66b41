"""The HTTP gateway every node serves: OpenAI API, status, events, console.

Public API::

    app = create_app(backend, console_dir=…, console_token=…, allowed_hosts=…)

``/v1/*`` goes to :func:`mesh_inference.api.openai.serve_openai` (the same
core that serves peers' Task streams), counted by a :class:`~mesh_inference.api.drain.Drain`
so a leaving node finishes them (and answers new ones 503). ``/health``, ``/api/status`` and
``/api/events`` are open, with secrets removed unless the request proved
the console login; the guard in :mod:`mesh_inference.api.security` runs in
front of every route. ``/metrics`` (Prometheus) and the request counters
come from :mod:`mesh_inference.api.metrics`. The backend (the node) is a
:class:`GatewayBackend`; this module owns no mesh state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh_inference.api import continuity, metrics, security
from mesh_inference.api.drain import SHUTTING_DOWN, Drain
from mesh_inference.api.openai import (
    NoHostError,
    OpenAIBackend,
    openai_error,
    serve_openai,
)
from mesh_inference.net.proxy import MAX_BODY, ProxiedResponse, ProxyError

log = logging.getLogger(__name__)

SSE_KEEPALIVE = 15.0
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
BACKEND_KEY: web.AppKey[Any] = web.AppKey("backend")
ALIASES_KEY = web.AppKey("model_aliases", tuple[str, ...])  # --model-alias names
WAIT_KEY = web.AppKey("request_wait", float)  # --request-wait
DRAIN_KEY = web.AppKey("drain", Drain)  # API requests in flight; refuses new ones on stop
RELAYED_HEADERS = ("content-type", "cache-control", "x-request-id")

__all__ = ["GatewayBackend", "NoHostError", "create_app"]


class GatewayBackend(OpenAIBackend, Protocol):
    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]: ...


async def _relay(request: web.Request, resp: ProxiedResponse) -> web.StreamResponse:
    """Stream a proxied response back to the HTTP client, chunk by chunk."""
    out = web.StreamResponse(status=resp.status)
    for k, v in resp.headers:
        if k in RELAYED_HEADERS:
            out.headers[k] = v
    is_sse = out.headers.get("content-type", "").startswith("text/event-stream")
    try:
        await out.prepare(request)
        if request.method != "HEAD":  # a HEAD answer has no body: one would desync the connection
            async for chunk in resp.body_iter:
                await out.write(chunk)
    except (TimeoutError, ProxyError, aiohttp.ClientError, ConnectionError) as exc:
        log.warning("response stream broke: %s", exc)
        if is_sse and out.prepared:
            err = {
                "error": {
                    "message": f"the stream broke: {exc}",
                    "type": "server_error",
                    "code": "stream_broken",
                }
            }
            with contextlib.suppress(Exception):
                await out.write(f"data: {json.dumps(err)}\n\n".encode())
        return out
    finally:
        with contextlib.suppress(Exception):
            await resp.aclose()
    with contextlib.suppress(ConnectionError):
        await out.write_eof()
    return out


async def openai_route(request: web.Request) -> web.StreamResponse:
    """Every ``/v1`` path: the core decides (404/405 for what does not exist)."""
    drain = request.app[DRAIN_KEY]
    if drain.closing:  # the node is leaving: what runs completes, nothing new starts
        return openai_error(503, SHUTTING_DOWN, "service_unavailable", "shutting_down")
    with drain.track():
        return await _openai_route(request)


async def _openai_route(request: web.Request) -> web.StreamResponse:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return openai_error(413, "request body too large", "invalid_request_error", "too_large")
    headers: Any = request.headers
    aliases: tuple[str, ...] = request.app[ALIASES_KEY]
    if request.app[security.POLICY_KEY].api_key is not None:
        # The guard checked it; the key goes no further (not to the host, not to the engine).
        headers = [(k, v) for k, v in headers.items() if k.lower() != "authorization"]
    resp = await serve_openai(
        request.app[BACKEND_KEY], request.app[SESSION_KEY], request.method, request.path,
        headers, raw, aliases=aliases, wait=request.app[WAIT_KEY],
    )
    return await _relay(request, metrics.watch_completion(request, resp))


async def health(request: web.Request) -> web.Response:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    return web.json_response({"status": "ok", "ready": bool(backend.status().get("ready"))})


async def status(request: web.Request) -> web.Response:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    data = backend.status()
    if not security.has_access(request):
        data = security.public_view(data)
    return web.json_response(data, headers={"cache-control": "no-store"})


async def events(request: web.Request) -> web.StreamResponse:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    private = security.has_access(request)
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-store"}
    )
    await resp.prepare(request)
    stream = backend.subscribe()
    try:
        nxt: asyncio.Task[tuple[str, dict[str, Any]]] | None = None
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({nxt}, timeout=SSE_KEEPALIVE)
            if not done:
                await resp.write(b": keepalive\n\n")
                continue
            name, data = nxt.result()
            nxt = None
            if not private:
                data = security.public_view(data)
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
    except (ConnectionError, StopAsyncIteration, asyncio.CancelledError):
        pass
    finally:
        if nxt is not None:
            nxt.cancel()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
    return resp


def create_app(
    backend: GatewayBackend,
    *,
    console_dir: Path | None,
    console_token: str,
    allowed_hosts: Iterable[str] = (),
    api_key: str | None = None,
    model_aliases: Iterable[str] = (),
    request_wait: float = continuity.WAIT,
    drain: Drain | None = None,
) -> web.Application:
    """The gateway app. ``console_token``: the login secret (``<state-dir>/console-token``);
    ``allowed_hosts``: names and addresses besides loopback that the node answers to
    (see :func:`mesh_inference.api.security.own_host_names`); ``api_key``: the Bearer key
    ``/v1/*`` needs (None: open); ``model_aliases``: more names for the served model;
    ``request_wait``: how long a request waits for the mesh to serve (again), in seconds;
    ``drain``: tracks the ``/v1`` requests in flight, and refuses new ones once closed."""
    app = web.Application(client_max_size=MAX_BODY + 1024)
    app[BACKEND_KEY] = backend
    app[DRAIN_KEY] = drain if drain is not None else Drain()
    app[ALIASES_KEY] = tuple(model_aliases)
    app[WAIT_KEY] = float(request_wait)
    # Before the guard: its middleware counts the requests the guard refuses too.
    metrics.install(app, backend, session=lambda: app[SESSION_KEY])
    security.install(app, security.AccessPolicy.of(console_token, allowed_hosts, api_key))

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION_KEY] = aiohttp.ClientSession()
        yield
        await app[SESSION_KEY].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/v1", openai_route)
    app.router.add_route("*", "/v1/{tail:.*}", openai_route)
    app.router.add_get("/health", health)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/events", events)
    if console_dir is not None and (console_dir / "index.html").is_file():
        index = console_dir / "index.html"

        async def console_index(request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.router.add_get("/", console_index)
        app.router.add_static("/", console_dir, show_index=False, follow_symlinks=False)
    return app
