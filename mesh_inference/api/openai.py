"""The OpenAI-compatible API core: one function serves ``/v1/*`` for HTTP and for peers.

Public API::

    resp = await serve_openai(backend, session, method, path, headers, body)
    handler = make_task_handler(backend, session)   # for net.proxy.serve_task
    checked = validate_body("chat" | "completion", raw)   # dict, or an error response

Both the aiohttp routes (gateway.py) and a peer's Task stream (the node's
``serve_task``) come through :func:`serve_openai`, so a peer reaches the
OpenAI routes and nothing else: any other path is a 404 here, and the
console, status and model routes live only in the aiohttp app. Every body
is validated on the node that receives it, so a bad request never reaches
the engine or the network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh_inference.core.messages import TaskHead
from mesh_inference.net.proxy import (
    MAX_BODY,
    Handler,
    ProxiedResponse,
    ProxyError,
    filter_headers,
    forward_request,
)

log = logging.getLogger(__name__)

MAX_DEPTH = 64  # generous for tool schemas; far below what could exhaust the stack
HOPS = "x-mesh-hops"
JSON_TYPE = "application/json"

Headers = Mapping[str, str] | Iterable[tuple[str, str]]

# path -> (method, body kind); ``None``: no body to validate.
_ROUTES: dict[str, tuple[str, str | None]] = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "completion"),
    "/v1/models": ("GET", None),
}


class NoHostError(Exception):
    """The mesh has no host to forward to (none elected, or no connection to it)."""


class OpenAIBackend(Protocol):
    def status(self) -> dict[str, Any]: ...
    def engine_url(self) -> str | None: ...
    def is_host(self) -> bool: ...
    def served_model(self) -> str | None: ...
    async def open_host_stream(self) -> tuple[asyncio.StreamReader, Any]: ...


# ---------------------------------------------------------------------- errors
def error_json(
    message: str, type: str, code: str, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def openai_error(
    status: int, message: str, type: str, code: str, param: str | None = None
) -> web.Response:
    """An OpenAI-style error as an aiohttp response (for the HTTP-only routes)."""
    return web.json_response(error_json(message, type, code, param), status=status)


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


def json_response(status: int, data: dict[str, Any]) -> ProxiedResponse:
    return ProxiedResponse(
        status, [("content-type", JSON_TYPE)], _single(json.dumps(data).encode())
    )


def error_response(
    status: int, message: str, type: str, code: str, param: str | None = None
) -> ProxiedResponse:
    return json_response(status, error_json(message, type, code, param))


def _invalid(message: str, param: str | None = None) -> ProxiedResponse:
    return error_response(400, message, "invalid_request_error", "invalid_request", param)


# ---------------------------------------------------------------------- validation
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _too_deep(value: Any, limit: int) -> bool:
    # Iterative: a recursive walk could itself hit the recursion limit.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json_object(raw: bytes) -> dict[str, Any] | ProxiedResponse:
    """Strict JSON: no NaN/Infinity, bounded size and depth, an object at the top."""
    if len(raw) > MAX_BODY:
        return error_response(413, "request body too large", "invalid_request_error",
                              "too_large")
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        return _invalid(f"request body is nested more than {MAX_DEPTH} levels deep")
    except (UnicodeDecodeError, ValueError) as exc:
        return _invalid(f"request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _invalid("request body must be a JSON object")
    if _too_deep(body, MAX_DEPTH):
        return _invalid(f"request body is nested more than {MAX_DEPTH} levels deep")
    return body


def validate_body(kind: str, raw: bytes) -> dict[str, Any] | ProxiedResponse:
    """Parse and check an OpenAI request body; an error response if it is bad."""
    body = parse_json_object(raw)
    if isinstance(body, ProxiedResponse):
        return body
    if "model" in body and not isinstance(body["model"], str):
        return _invalid("'model' must be a string", "model")
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return _invalid("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return _invalid(f"messages[{i}] must be an object with a string 'role'",
                                "messages")
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                return _invalid(f"messages[{i}].content must be a string or a list",
                                "messages")
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


def is_json_type(content_type: str | None) -> bool:
    """``application/json``, parameters (charset) allowed."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == JSON_TYPE


# ---------------------------------------------------------------------- serving
async def call_engine(
    session: aiohttp.ClientSession,
    base_url: str,
    method: str,
    path: str,
    headers: Headers,
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


def _models(backend: OpenAIBackend) -> ProxiedResponse:
    name = backend.served_model()
    data = (
        []
        if name is None
        else [{"id": name, "object": "model", "created": 0, "owned_by": "mesh-inference"}]
    )
    return json_response(200, {"object": "list", "data": data})


async def _completion(
    backend: OpenAIBackend,
    session: aiohttp.ClientSession,
    path: str,
    headers: tuple[tuple[str, str], ...],
    raw: bytes,
) -> ProxiedResponse:
    if backend.is_host():
        url = backend.engine_url()
        if url is None:
            engine = backend.status().get("engine", {})
            state = engine.get("state", "unknown")
            why = f"{state}: {engine['detail']}" if engine.get("detail") else state
            return error_response(
                503,
                f"The mesh has no engine ready yet ({why}); try again in a few seconds.",
                "service_unavailable",
                "engine_not_ready",
            )
        try:
            return await call_engine(session, url, "POST", path, headers, raw)
        except aiohttp.ClientError as exc:
            return error_response(
                502, f"the engine did not answer: {exc}", "server_error", "engine_unreachable"
            )
    if dict(headers).get(HOPS, "0") != "0":
        # A peer sent it here believing we are the host: never bounce it on (no loops).
        return error_response(
            503,
            "this node is not the host either (views of the mesh differ for a moment); retry",
            "service_unavailable",
            "no_host",
        )
    try:
        reader, writer = await backend.open_host_stream()
    except NoHostError as exc:
        return error_response(
            503, f"The mesh has no host yet: {exc}", "service_unavailable", "no_host"
        )
    onward = [*(h for h in headers if h[0] != HOPS), (HOPS, "1")]
    try:
        return await forward_request(
            reader, writer, method="POST", path=path, headers=onward, body=raw
        )
    except ProxyError as exc:
        return error_response(
            502, f"the host did not answer: {exc}", "server_error", "host_unreachable"
        )


async def serve_openai(
    backend: OpenAIBackend,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: Headers,
    body: bytes,
) -> ProxiedResponse:
    """Serve one OpenAI API request: to the engine, to the host, or an error.

    ``path`` may carry a query string (ignored). Only the routes in
    ``_ROUTES`` exist; anything else is a 404, a wrong method a 405.
    """
    route = path.split("?", 1)[0]
    known = _ROUTES.get(route)
    if known is None:
        return error_response(
            404, f"no such API route: {route[:200]}", "invalid_request_error", "not_found"
        )
    allowed, kind = known
    method = method.upper()
    if method != allowed:
        return error_response(
            405, f"{route} takes {allowed}, not {method}", "invalid_request_error",
            "method_not_allowed",
        )
    if kind is None:
        return _models(backend)
    pairs = filter_headers(headers)
    if not is_json_type(dict(pairs).get("content-type")):
        return error_response(
            415, f"the request body must be {JSON_TYPE}", "invalid_request_error",
            "unsupported_media_type",
        )
    checked = validate_body(kind, body)
    if isinstance(checked, ProxiedResponse):
        return checked
    return await _completion(backend, session, route, pairs, body)


def make_task_handler(backend: OpenAIBackend, session: aiohttp.ClientSession) -> Handler:
    """The ``serve_task`` handler for peers' Task streams: the OpenAI routes only."""

    async def handler(head: TaskHead, body: bytes) -> ProxiedResponse:
        return await serve_openai(backend, session, head.method, head.path, head.headers, body)

    return handler
