"""The OpenAI-compatible API core: one function serves ``/v1/*`` for HTTP and for peers.

Public API::

    resp = await serve_openai(backend, session, method, path, headers, body, aliases=())
    handler = make_task_handler(backend, session, aliases)   # for net.proxy.serve_task
    checked = validate_body("chat" | "completion", raw)   # dict, or an error response
    onward = check_model(checked, raw, served_name, aliases)   # bytes, or a 404

Both the aiohttp routes (gateway.py) and a peer's Task stream (the node's
``serve_task``) come through :func:`serve_openai`, so a peer reaches the
OpenAI routes and nothing else: any other path is a 404 here, and the
console, status and model routes live only in the aiohttp app. Every body
is validated on the node that receives it, so a bad request never reaches
the engine or the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh_inference.api import continuity, replay
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


def json_response(status: int, data: dict[str, Any]) -> ProxiedResponse:
    return ProxiedResponse.of_bytes(status, [("content-type", JSON_TYPE)],
                                    json.dumps(data).encode())


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


# Chat roles the engine's chat templates know ("developer" is OpenAI's newer "system").
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Content parts that need a multimodal engine. llama-server runs without an mmproj here
# (and SmolLM2 is text-only), so they are refused rather than failing inside the engine.
MEDIA_PARTS = frozenset(
    {"image_url", "image", "input_image", "input_audio", "audio", "file", "video_url"}
)
MAX_STOP = 4


def _bad_type(message: str, param: str | None) -> ProxiedResponse:
    return error_response(400, message, "invalid_request_error", "invalid_type", param)


def _bad_value(message: str, param: str | None) -> ProxiedResponse:
    return error_response(400, message, "invalid_request_error", "invalid_value", param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_obj(v: Any) -> bool:
    return isinstance(v, dict)


def _is_list(v: Any) -> bool:
    return isinstance(v, list)


def _between(lo: float, hi: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: lo <= v <= hi), f"between {lo:g} and {hi:g}"


_AT_LEAST_1: tuple[Callable[[Any], bool], str] = (lambda v: v >= 1, ">= 1")
_ANY: tuple[None, str] = (None, "")
# field -> (what it must be, type check, (value check, what the value must be)).
# ``null`` means "not given" for every one of them, as in OpenAI's API.
_Rule = tuple[str, Callable[[Any], bool], tuple[Callable[[Any], bool] | None, str]]
_COMMON: dict[str, _Rule] = {
    "model": ("a string", _is_str, _ANY),
    "stream": ("a boolean", _is_bool, _ANY),
    "max_tokens": ("an integer", _is_int, _AT_LEAST_1),
    "temperature": ("a number", _is_num, _between(0, 2)),
    "top_p": ("a number", _is_num, _between(0, 1)),
    "n": ("an integer", _is_int, (lambda v: v == 1, "1 (one choice per request)")),
    "seed": ("an integer", _is_int, _ANY),
    "presence_penalty": ("a number", _is_num, _between(-2, 2)),
    "frequency_penalty": ("a number", _is_num, _between(-2, 2)),
    "logit_bias": ("an object", _is_obj, _ANY),
    "user": ("a string", _is_str, _ANY),
    "stream_options": ("an object", _is_obj, _ANY),
}
_CHAT: dict[str, _Rule] = {
    "max_completion_tokens": ("an integer", _is_int, _AT_LEAST_1),
    "logprobs": ("a boolean", _is_bool, _ANY),
    "top_logprobs": ("an integer", _is_int, _between(0, 20)),
    "tools": ("a list", _is_list, _ANY),
    "tool_choice": ("a string or an object", lambda v: isinstance(v, str | dict), _ANY),
    "parallel_tool_calls": ("a boolean", _is_bool, _ANY),
    "response_format": ("an object", _is_obj, _ANY),
}
_COMPLETION: dict[str, _Rule] = {
    "logprobs": ("an integer", _is_int, _between(0, 5)),
    "echo": ("a boolean", _is_bool, _ANY),
    "suffix": ("a string", _is_str, _ANY),
    "best_of": ("an integer", _is_int, (lambda v: v == 1, "1 (one choice per request)")),
}


def _check_fields(body: dict[str, Any], rules: dict[str, _Rule]) -> ProxiedResponse | None:
    for name, (kind, type_ok, (value_ok, values)) in rules.items():
        value = body.get(name)
        if value is None:
            continue
        if not type_ok(value):
            return _bad_type(f"'{name}' must be {kind}, not {_json_kind(value)}", name)
        if value_ok is not None and not value_ok(value):
            return _bad_value(f"'{name}' must be {values}; got {value!r}"[:300], name)
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _check_stop(stop: Any) -> ProxiedResponse | None:
    if stop is None or isinstance(stop, str):
        return None
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        return _bad_type("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        return _bad_value(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop")
    return None


def _check_content(i: int, content: Any) -> ProxiedResponse | None:
    where = f"messages[{i}].content"
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return _bad_type(f"{where} must be a string or a list of content parts", "messages")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            return _bad_type(f"{where}[{j}] must be an object with a string 'type'",
                             "messages")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                return _bad_type(f"{where}[{j}].text must be a string", "messages")
        elif kind in MEDIA_PARTS:
            return error_response(
                400, f"{where}[{j}]: '{kind}' content is not supported by this model "
                "(the mesh serves a text-only model)", "invalid_request_error",
                "unsupported_content", "messages",
            )
        else:
            return _bad_value(f"{where}[{j}] has an unknown content type {kind[:40]!r}",
                              "messages")
    return None


def _check_messages(msgs: Any) -> ProxiedResponse | None:
    if not isinstance(msgs, list):
        return _bad_type("'messages' must be a non-empty list", "messages")
    if not msgs:
        return _bad_value("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return _bad_type(f"messages[{i}] must be an object with a string 'role'",
                             "messages")
        if m["role"] not in ROLES:
            return _bad_value(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}; "
                              f"got {m['role'][:40]!r}", "messages")
        bad = _check_content(i, m.get("content"))
        if bad is not None:
            return bad
        for field, kind, ok in (("name", "a string", _is_str),
                                ("tool_call_id", "a string", _is_str),
                                ("tool_calls", "a list", _is_list)):
            if m.get(field) is not None and not ok(m[field]):
                return _bad_type(f"messages[{i}].{field} must be {kind}", "messages")
    return None


def validate_body(kind: str, raw: bytes) -> dict[str, Any] | ProxiedResponse:
    """Parse and check an OpenAI request body; an error response if it is bad.

    Wrong types are ``invalid_type``, values out of range ``invalid_value``, media
    content parts ``unsupported_content`` (all 400, ``invalid_request_error``).
    """
    body = parse_json_object(raw)
    if isinstance(body, ProxiedResponse):
        return body
    if kind == "chat":
        bad = _check_messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        ok = isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        )
        bad = None if ok else _bad_type("'prompt' must be a string or a list of strings",
                                        "prompt")
    if bad is None:
        bad = _check_fields(body, _COMMON) or _check_fields(
            body, _CHAT if kind == "chat" else _COMPLETION) or _check_stop(body.get("stop"))
    if bad is None and kind == "chat":
        fmt, tools = body.get("response_format"), body.get("tools")
        if isinstance(fmt, dict) and not isinstance(fmt.get("type"), str):
            bad = _bad_type("'response_format' must be an object with a string 'type'",
                            "response_format")
        elif isinstance(tools, list) and not all(isinstance(t, dict) for t in tools):
            bad = _bad_type("'tools' must be a list of objects", "tools")
    return body if bad is None else bad


def check_model(
    body: dict[str, Any], raw: bytes, served: str | None, aliases: Sequence[str] = ()
) -> bytes | ProxiedResponse:
    """The body to send on, or a 404 for a model this mesh does not serve.

    No ``model`` (or a mesh whose model is not known here yet) is accepted as is;
    an alias becomes the served name, so the host need not know this node's aliases.
    """
    asked = body.get("model")
    if asked is None or served is None or asked == served:
        return raw
    if asked in aliases:
        return json.dumps({**body, "model": served}).encode()
    names = ", ".join(repr(n) for n in (served, *aliases))
    return error_response(
        404, f"The model {asked[:200]!r} does not exist here; this mesh serves {names}",
        "invalid_request_error", "model_not_found", "model",
    )


# llama-server answers 500 for some bad input (a JSON type error deep in a message, an
# image without an mmproj, "tools" that is not a list); such answers become 400.
_ENGINE_INPUT_ERROR = re.compile(
    r"failed to parse|parse error|json\.exception|type_error|invalid|must be|expected"
    r"|not supported|unsupported|missing",
    re.IGNORECASE,
)
_ENGINE_ERROR_MAX = 64 * 1024


async def engine_input_error(resp: ProxiedResponse) -> ProxiedResponse:
    """A 500 whose JSON error blames the input → 400 ``invalid_request_error``, keeping
    the engine's message; every other answer passes through unchanged."""
    ctype = dict(resp.headers).get("content-type")
    if resp.status != 500 or not is_json_type(ctype):
        return resp
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.body_iter:
        chunks.append(chunk)
        size += len(chunk)
        if size > _ENGINE_ERROR_MAX:
            break
    data = b"".join(chunks)
    if size <= _ENGINE_ERROR_MAX:
        try:
            err = json.loads(data).get("error")
            message = err.get("message") if isinstance(err, dict) else None
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str) and _ENGINE_INPUT_ERROR.search(message):
            return error_response(400, message, "invalid_request_error", "invalid_request")

    async def replay() -> AsyncIterator[bytes]:
        try:
            yield data
            async for rest in resp.body_iter:
                yield rest
        finally:
            await resp.aclose()

    return ProxiedResponse(resp.status, resp.headers, replay())


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


def _models(backend: OpenAIBackend, aliases: Sequence[str] = ()) -> ProxiedResponse:
    name = backend.served_model()
    data = (
        []
        if name is None
        else [{"id": n, "object": "model", "created": 0, "owned_by": "mesh-inference"}
              for n in dict.fromkeys((name, *aliases))]
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
        if replay.HEADER in dict(headers):
            with contextlib.suppress(ValueError):
                await replay.replay_into_cache(session, url, json.loads(raw))
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
    *,
    aliases: Sequence[str] = (),
    wait: float = continuity.WAIT,
) -> ProxiedResponse:
    """Serve one OpenAI API request: to the engine, to the host, or an error.

    ``path`` may carry a query string (ignored). Only the routes in
    ``_ROUTES`` exist; anything else is a 404, a wrong method a 405.
    ``aliases``: other names accepted for the served model (``--model-alias``).
    ``wait``: how long a request from an HTTP client rides out a mesh that does not
    serve (see :mod:`mesh_inference.api.continuity`); peers' requests never wait here.
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
        return _models(backend, aliases)
    pairs = filter_headers(headers)
    if not is_json_type(dict(pairs).get("content-type")):
        return error_response(
            415, f"the request body must be {JSON_TYPE}", "invalid_request_error",
            "unsupported_media_type",
        )
    checked = validate_body(kind, body)
    if isinstance(checked, ProxiedResponse):
        return checked
    onward = check_model(checked, body, backend.served_model(), aliases)
    if isinstance(onward, ProxiedResponse):
        return onward

    async def attempt(raw: bytes, continuation: bool = False) -> ProxiedResponse:
        hdrs = (*pairs, (replay.HEADER, "1")) if continuation else pairs
        return await engine_input_error(await _completion(backend, session, route, hdrs, raw))

    if dict(pairs).get(HOPS, "0") != "0":
        # From a peer: the node that received the request waits, retries and continues.
        return await attempt(onward)
    # Only nodes mark continuations (the replay costs the host a decode per token).
    pairs = tuple(h for h in pairs if h[0] != replay.HEADER)
    request = json.loads(onward)
    return await continuity.complete_with_retries(attempt, kind, request, wait=wait)


def make_task_handler(
    backend: OpenAIBackend, session: aiohttp.ClientSession, aliases: Sequence[str] = ()
) -> Handler:
    """The ``serve_task`` handler for peers' Task streams: the OpenAI routes only.

    No API key here: peers proved the mesh secret, and the key is checked at the HTTP
    edge of the node that received the request (:mod:`mesh_inference.api.security`).
    """

    async def handler(head: TaskHead, body: bytes) -> ProxiedResponse:
        return await serve_openai(backend, session, head.method, head.path, head.headers, body,
                                  aliases=aliases)

    return handler
