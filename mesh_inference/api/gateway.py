"""The HTTP gateway every node serves: OpenAI API, status, events, console.

On the host with a ready engine, API requests go to llama-server on
127.0.0.1; on other nodes they go to the host over QUIC (proxy.py). The
backend (the node) is a :class:`GatewayBackend`; this module owns no mesh
state. Every request body is validated here, on whichever node receives
it, so a bad request never reaches the engine or the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh_inference.core.messages import TaskHead
from mesh_inference.net.proxy import ProxiedResponse, ProxyError, filter_headers, forward_request

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20
SSE_KEEPALIVE = 15.0
HOPS = "x-mesh-hops"
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
BACKEND_KEY: web.AppKey[Any] = web.AppKey("backend")


class NoHostError(Exception):
    pass


class GatewayBackend(Protocol):
    def status(self) -> dict[str, Any]: ...
    def engine_url(self) -> str | None: ...
    def is_host(self) -> bool: ...
    def served_model(self) -> str | None: ...
    async def open_host_stream(self) -> tuple[asyncio.StreamReader, Any]: ...
    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]: ...


def openai_error(
    status: int, message: str, type: str, code: str, param: str | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        status=status,
    )


def _invalid(message: str, param: str | None = None) -> web.Response:
    return openai_error(400, message, "invalid_request_error", "invalid_request", param)


def validate_body(kind: str, raw: bytes) -> dict[str, Any] | web.Response:
    """Parse and check an OpenAI request body; an error response if it is bad."""
    if len(raw) > MAX_BODY:
        return openai_error(413, "request body too large", "invalid_request_error", "too_large")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return _invalid(f"request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _invalid("request body must be a JSON object")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return _invalid("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return _invalid(f"messages[{i}] must be an object with a string 'role'", "messages")
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                return _invalid(f"messages[{i}].content must be a string or a list", "messages")
    else:
        prompt = body.get("prompt")
        ok = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        )
        if not ok:
            return _invalid("'prompt' must be a string or a list of strings", "prompt")
    if "stream" in body and not isinstance(body["stream"], bool):
        return _invalid("'stream' must be a boolean", "stream")
    mt = body.get("max_tokens")
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
        return _invalid("'max_tokens' must be an integer >= 1", "max_tokens")
    t = body.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or t < 0):
        return _invalid("'temperature' must be a number >= 0", "temperature")
    return body


async def _relay(request: web.Request, resp: ProxiedResponse) -> web.StreamResponse:
    """Stream a proxied response back to the HTTP client, chunk by chunk."""
    out = web.StreamResponse(status=resp.status)
    for k, v in resp.headers:
        if k in ("content-type", "cache-control", "x-request-id"):
            out.headers[k] = v
    await out.prepare(request)
    is_sse = out.headers.get("content-type", "").startswith("text/event-stream")
    try:
        async for chunk in resp.body_iter:
            await out.write(chunk)
    except (TimeoutError, ProxyError, aiohttp.ClientError, ConnectionError) as exc:
        log.warning("response stream broke: %s", exc)
        if is_sse:
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
        aclose = getattr(resp.body_iter, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
    with contextlib.suppress(ConnectionError):
        await out.write_eof()
    return out


async def call_engine(
    session: aiohttp.ClientSession,
    base_url: str,
    method: str,
    path: str,
    headers: Any,
    body: bytes,
) -> ProxiedResponse:
    """One request to a local HTTP service, its body as an async iterator."""
    resp = await session.request(
        method,
        base_url + path,
        data=body or None,
        headers=dict(filter_headers(headers)),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
    )

    async def body_iter() -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        finally:
            resp.release()

    headers_out = [
        (k.lower(), v)
        for k, v in resp.headers.items()
        if k.lower() in ("content-type", "cache-control")
    ]
    return ProxiedResponse(resp.status, headers_out, body_iter())


def make_local_handler(base_url: str, session: aiohttp.ClientSession) -> Any:
    """A serve_task handler that replays a proxied request against ``base_url``."""

    async def handler(head: TaskHead, body: bytes) -> ProxiedResponse:
        try:
            return await call_engine(session, base_url, head.method, head.path, head.headers, body)
        except aiohttp.ClientError as exc:
            msg = json.dumps(
                {
                    "error": {
                        "message": f"host gateway unreachable: {exc}",
                        "type": "service_unavailable",
                        "code": "no_host",
                    }
                }
            )

            async def one() -> AsyncIterator[bytes]:
                yield msg.encode()

            return ProxiedResponse(503, [("content-type", "application/json")], one())

    return handler


async def _api(request: web.Request, kind: str) -> web.StreamResponse:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    raw = await request.read()
    checked = validate_body(kind, raw)
    if isinstance(checked, web.Response):
        return checked
    hops = request.headers.get(HOPS, "0")
    if backend.is_host():
        url = backend.engine_url()
        if url is None:
            engine = backend.status().get("engine", {})
            state = engine.get("state", "unknown")
            why = f"{state}: {engine['detail']}" if engine.get("detail") else state
            return openai_error(
                503,
                f"The mesh has no engine ready yet ({why}); try again in a few seconds.",
                "service_unavailable",
                "engine_not_ready",
            )
        try:
            resp = await call_engine(
                request.app[SESSION_KEY], url, "POST", request.path, request.headers, raw
            )
        except aiohttp.ClientError as exc:
            return openai_error(
                502, f"the engine did not answer: {exc}", "server_error", "engine_unreachable"
            )
        return await _relay(request, resp)
    if hops != "0":
        return openai_error(
            503,
            "this node is not the host either (views of the mesh differ for a moment); retry",
            "service_unavailable",
            "no_host",
        )
    try:
        reader, writer = await backend.open_host_stream()
    except NoHostError as exc:
        return openai_error(
            503, f"The mesh has no host yet: {exc}", "service_unavailable", "no_host"
        )
    headers = [*filter_headers(request.headers), (HOPS, "1")]
    try:
        resp = await forward_request(
            reader, writer, method="POST", path=request.path, headers=headers, body=raw
        )
    except ProxyError as exc:
        return openai_error(
            502, f"the host did not answer: {exc}", "server_error", "host_unreachable"
        )
    return await _relay(request, resp)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _api(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _api(request, "completion")


async def models(request: web.Request) -> web.Response:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    name = backend.served_model()
    data = (
        []
        if name is None
        else [{"id": name, "object": "model", "created": 0, "owned_by": "mesh-inference"}]
    )
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    return web.json_response({"status": "ok", "ready": bool(backend.status().get("ready"))})


async def status(request: web.Request) -> web.Response:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    return web.json_response(backend.status())


async def events(request: web.Request) -> web.StreamResponse:
    backend: GatewayBackend = request.app[BACKEND_KEY]
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
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


def create_app(backend: GatewayBackend, *, console_dir: Path | None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY + 1024)
    app[BACKEND_KEY] = backend

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION_KEY] = aiohttp.ClientSession()
        yield
        await app[SESSION_KEY].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
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
