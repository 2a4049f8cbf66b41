"""Bad API input is refused by the gateway itself, OpenAI-style, before the engine sees it.

Real aiohttp servers on 127.0.0.1 (port 0), as in test_gateway_core.py: a
fake llama-server, the host's gateway in front of it, and a worker's gateway
that reaches the host's OpenAI core over a real TCP stream through the DCF
proxy (exactly as a peer's Task is served). Every bad body is sent to both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gatewaymesh import start, task_server

from mesh_inference.api.gateway import NoHostError, create_app

pytestmark = pytest.mark.timeout(60)
TOKEN = "t" * 43  # a console token; these tests do not log in
SERVED = "smollm2-135m"
ALIAS = "gpt-4o-mini"
USER = [{"role": "user", "content": "hi"}]
CHAT = {"messages": USER}
PROMPT = {"prompt": "Once upon a time"}
LLAMA_PARSE_ERROR = ("Failed to parse messages: [json.exception.type_error.302] type must be "
                     "string, but is number")


def fake_llama(seen: list[dict[str, Any]]) -> web.Application:
    """Answers like llama-server; ``x_engine: [status, message]`` makes it fail that way."""
    app = web.Application()

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if "x_engine" in body:
            status, message = body["x_engine"]
            kind = "server_error" if status >= 500 else "invalid_request_error"
            return web.json_response(
                {"error": {"code": status, "message": message, "type": kind}}, status=status)
        return web.json_response({"object": "chat.completion", "model": body.get("model"),
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "ok"}}]})

    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/completions", answer)
    return app


class Backend:
    def __init__(self, engine: str | None, opener: Any = None) -> None:
        self.engine, self.opener = engine, opener

    def status(self) -> dict[str, Any]:
        return {"engine": {"state": "ready"}, "ready": True, "node": {"id": "x"}}

    def engine_url(self) -> str | None:
        return self.engine

    def is_host(self) -> bool:
        return self.opener is None

    def served_model(self) -> str | None:
        return SERVED

    async def open_host_stream(self) -> tuple[Any, Any]:
        if self.opener is None:
            raise NoHostError("no host")
        return await self.opener()  # type: ignore[no-any-return]

    async def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "status", self.status()


@pytest.fixture
async def mesh() -> AsyncIterator[dict[str, Any]]:
    """fake llama ← host gateway; fake llama ← host Task handler ← TCP ← worker gateway.

    Only the worker knows the alias: it must hand the host the served name."""
    seen: list[dict[str, Any]] = []
    r1, llama_url = await start(fake_llama(seen))
    host_backend = Backend(llama_url)
    # request_wait: a 503 from a loading engine is waited out for that long, then answered.
    r2, host_url = await start(create_app(host_backend, console_dir=None, console_token=TOKEN,
                                          model_aliases=[ALIAS], request_wait=0.2))
    async with task_server(host_backend) as opener:
        r3, worker_url = await start(create_app(Backend(None, opener), console_dir=None,
                                                console_token=TOKEN, model_aliases=[ALIAS],
                                                request_wait=0.2))
        yield {"host": host_url, "worker": worker_url, "seen": seen}
    for r in (r3, r2, r1):
        await r.cleanup()


async def post(url: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s, s.post(
        url, data=data, headers={"content-type": "application/json"}
    ) as r:
        return r.status, await r.json()


def chat(**fields: Any) -> dict[str, Any]:
    return {**CHAT, **fields}


def content(*parts: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(parts)}]}


DEEP = b'{"messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * 64 + b"]" * 64 + b"}"
# (name, route, body, status, code, param)
BAD: list[tuple[str, str, bytes | dict[str, Any], int, str, str | None]] = [
    # the body as a whole
    ("not json", "chat", b"{nope", 400, "invalid_request", None),
    ("not an object", "chat", b"[1, 2]", 400, "invalid_request", None),
    ("NaN", "chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     400, "invalid_request", None),
    ("Infinity", "chat", b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}',
     400, "invalid_request", None),
    ("-Infinity", "chat", b'{"messages": [{"role": "user", "content": "x"}], "seed": -Infinity}',
     400, "invalid_request", None),
    ("1e999", "chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
     400, "invalid_request", None),
    ("65 levels", "chat", DEEP, 400, "invalid_request", None),
    ("100k levels", "chat", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
     "invalid_request", None),
    # messages
    ("no messages", "chat", {"temperature": 1}, 400, "invalid_type", "messages"),
    ("messages a string", "chat", {"messages": "hi"}, 400, "invalid_type", "messages"),
    ("no message", "chat", {"messages": []}, 400, "invalid_value", "messages"),
    ("message a number", "chat", {"messages": [5]}, 400, "invalid_type", "messages"),
    ("no role", "chat", {"messages": [{"content": "x"}]}, 400, "invalid_type", "messages"),
    ("role a number", "chat", {"messages": [{"role": 1, "content": "x"}]}, 400, "invalid_type",
     "messages"),
    ("unknown role", "chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_value", "messages"),
    ("content a number", "chat", {"messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_type", "messages"),
    ("content an object", "chat", {"messages": [{"role": "user", "content": {"text": "x"}}]},
     400, "invalid_type", "messages"),
    ("name a number", "chat", {"messages": [{"role": "user", "content": "x", "name": 3}]}, 400,
     "invalid_type", "messages"),
    ("tool_calls an object", "chat", {"messages": [*USER, {"role": "assistant", "content": "x",
                                                            "tool_calls": {}}]},
     400, "invalid_type", "messages"),
    # content parts
    ("part a string", "chat", content("hi"), 400, "invalid_type", "messages"),
    ("part without type", "chat", content({"text": "hi"}), 400, "invalid_type", "messages"),
    ("part type a number", "chat", content({"type": 1, "text": "hi"}), 400, "invalid_type",
     "messages"),
    ("text a number", "chat", content({"type": "text", "text": 5}), 400, "invalid_type",
     "messages"),
    ("text missing", "chat", content({"type": "text"}), 400, "invalid_type", "messages"),
    ("image part", "chat", content({"type": "text", "text": "what is this?"},
                                   {"type": "image_url", "image_url": {"url": "data:,"}}),
     400, "unsupported_content", "messages"),
    ("audio part", "chat", content({"type": "input_audio", "input_audio": {"data": ""}}), 400,
     "unsupported_content", "messages"),
    ("unknown part", "chat", content({"type": "hologram"}), 400, "invalid_value", "messages"),
    # common fields
    ("model a number", "chat", chat(model=7), 400, "invalid_type", "model"),
    ("stream a string", "chat", chat(stream="yes"), 400, "invalid_type", "stream"),
    ("stream a number", "chat", chat(stream=1), 400, "invalid_type", "stream"),
    ("max_tokens a string", "chat", chat(max_tokens="10"), 400, "invalid_type", "max_tokens"),
    ("max_tokens a float", "chat", chat(max_tokens=1.5), 400, "invalid_type", "max_tokens"),
    ("max_tokens a bool", "chat", chat(max_tokens=True), 400, "invalid_type", "max_tokens"),
    ("max_tokens 0", "chat", chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max_completion_tokens -1", "chat", chat(max_completion_tokens=-1), 400, "invalid_value",
     "max_completion_tokens"),
    ("temperature a string", "chat", chat(temperature="hot"), 400, "invalid_type",
     "temperature"),
    ("temperature < 0", "chat", chat(temperature=-0.1), 400, "invalid_value", "temperature"),
    ("temperature > 2", "chat", chat(temperature=2.5), 400, "invalid_value", "temperature"),
    ("top_p > 1", "chat", chat(top_p=1.5), 400, "invalid_value", "top_p"),
    ("top_p < 0", "chat", chat(top_p=-0.5), 400, "invalid_value", "top_p"),
    ("top_p a list", "chat", chat(top_p=[1]), 400, "invalid_type", "top_p"),
    ("n 2", "chat", chat(n=2), 400, "invalid_value", "n"),
    ("n 0", "chat", chat(n=0), 400, "invalid_value", "n"),
    ("n a string", "chat", chat(n="1"), 400, "invalid_type", "n"),
    ("stop a number", "chat", chat(stop=5), 400, "invalid_type", "stop"),
    ("stop not strings", "chat", chat(stop=["a", 1]), 400, "invalid_type", "stop"),
    ("stop 5 strings", "chat", chat(stop=list("abcde")), 400, "invalid_value", "stop"),
    ("seed a float", "chat", chat(seed=1.5), 400, "invalid_type", "seed"),
    ("seed a string", "chat", chat(seed="42"), 400, "invalid_type", "seed"),
    ("presence_penalty 3", "chat", chat(presence_penalty=3), 400, "invalid_value",
     "presence_penalty"),
    ("frequency_penalty -2.5", "chat", chat(frequency_penalty=-2.5), 400, "invalid_value",
     "frequency_penalty"),
    ("frequency_penalty a string", "chat", chat(frequency_penalty="x"), 400, "invalid_type",
     "frequency_penalty"),
    ("logit_bias a list", "chat", chat(logit_bias=[1]), 400, "invalid_type", "logit_bias"),
    ("user a number", "chat", chat(user=5), 400, "invalid_type", "user"),
    ("stream_options a bool", "chat", chat(stream=True, stream_options=True), 400,
     "invalid_type", "stream_options"),
    # chat-only fields
    ("tools an object", "chat", chat(tools={"type": "function"}), 400, "invalid_type", "tools"),
    ("tools not objects", "chat", chat(tools=[5]), 400, "invalid_type", "tools"),
    ("tool_choice a number", "chat", chat(tool_choice=5), 400, "invalid_type", "tool_choice"),
    ("response_format a string", "chat", chat(response_format="json"), 400, "invalid_type",
     "response_format"),
    ("response_format without type", "chat", chat(response_format={}), 400, "invalid_type",
     "response_format"),
    ("logprobs a string", "chat", chat(logprobs="yes"), 400, "invalid_type", "logprobs"),
    ("top_logprobs 21", "chat", chat(top_logprobs=21), 400, "invalid_value", "top_logprobs"),
    ("parallel_tool_calls a string", "chat", chat(parallel_tool_calls="no"), 400,
     "invalid_type", "parallel_tool_calls"),
    # /v1/completions
    ("prompt a number", "completion", {"prompt": 3}, 400, "invalid_type", "prompt"),
    ("prompt empty list", "completion", {"prompt": []}, 400, "invalid_type", "prompt"),
    ("prompt not strings", "completion", {"prompt": ["a", 1]}, 400, "invalid_type", "prompt"),
    ("no prompt", "completion", {"max_tokens": 3}, 400, "invalid_type", "prompt"),
    ("completion logprobs 6", "completion", {**PROMPT, "logprobs": 6}, 400, "invalid_value",
     "logprobs"),
    ("completion echo a string", "completion", {**PROMPT, "echo": "y"}, 400, "invalid_type",
     "echo"),
    ("completion n 3", "completion", {**PROMPT, "n": 3}, 400, "invalid_value", "n"),
    ("completion best_of 2", "completion", {**PROMPT, "best_of": 2}, 400, "invalid_value",
     "best_of"),
    ("completion stop 5", "completion", {**PROMPT, "stop": list("abcde")}, 400, "invalid_value",
     "stop"),
    # the model
    ("unknown model", "chat", chat(model="gpt-5"), 404, "model_not_found", "model"),
    ("unknown model (completion)", "completion", {**PROMPT, "model": "llama-70b"}, 404,
     "model_not_found", "model"),
    ("model name in another case", "chat", chat(model=SERVED.upper()), 404, "model_not_found",
     "model"),
]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@pytest.mark.parametrize("where", ["host", "worker"])
@pytest.mark.parametrize(("route", "body", "status", "code", "param"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
async def test_bad_input_is_refused(mesh: dict[str, Any], where: str, route: str,
                                    body: bytes | dict[str, Any], status: int, code: str,
                                    param: str | None) -> None:
    got, answer = await post(mesh[where] + PATHS[route], body)
    assert (got, answer["error"]["code"], answer["error"]["param"]) == (status, code, param), \
        answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    assert mesh["seen"] == []  # the engine never saw it


async def test_unknown_model_names_the_served_ones(mesh: dict[str, Any]) -> None:
    _, answer = await post(mesh["host"] + PATHS["chat"], chat(model="gpt-5"))
    message = answer["error"]["message"]
    assert "gpt-5" in message and SERVED in message and ALIAS in message


async def test_image_part_says_not_supported(mesh: dict[str, Any]) -> None:
    _, answer = await post(mesh["worker"] + PATHS["chat"], content(
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}))
    assert "not supported by this model" in answer["error"]["message"]


GOOD: list[tuple[str, str, dict[str, Any]]] = [
    ("minimal", "chat", CHAT),
    ("served model", "chat", chat(model=SERVED)),
    ("nulls are defaults", "chat", chat(model=None, temperature=None, top_p=None, n=None,
                                        stop=None, stream=None, max_tokens=None, seed=None,
                                        tools=None, response_format=None)),
    ("edges of the ranges", "chat", chat(temperature=2, top_p=0, n=1, seed=-1,
                                         presence_penalty=-2, frequency_penalty=2.0,
                                         max_tokens=1, top_logprobs=20, logprobs=True)),
    ("stop string", "chat", chat(stop="\n")),
    ("four stops", "chat", chat(stop=list("abcd"))),
    ("text parts", "chat", content({"type": "text", "text": "a"}, {"type": "text", "text": "b"})),
    ("tools", "chat", chat(tools=[{"type": "function", "function": {"name": "f"}}],
                           tool_choice="auto", parallel_tool_calls=False)),
    ("response_format", "chat", chat(response_format={"type": "json_object"})),
    ("assistant tool call and answer", "chat", {"messages": [
        *USER, {"role": "assistant", "content": None,
                "tool_calls": [{"id": "1", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "42"}]}),
    ("developer role", "chat", {"messages": [{"role": "developer", "content": "be brief"},
                                             *USER]}),
    ("nesting of 64", "chat", json.loads(DEEP.replace(b"[" * 64 + b"]" * 64,
                                                       b"[" * 62 + b"]" * 62))),
    ("prompt", "completion", {**PROMPT, "model": SERVED, "logprobs": 2, "echo": False}),
    ("prompts", "completion", {"prompt": ["a", "b"], "best_of": 1, "suffix": "."}),
]


@pytest.mark.parametrize("where", ["host", "worker"])
@pytest.mark.parametrize(("route", "body"), [case[1:] for case in GOOD],
                         ids=[case[0] for case in GOOD])
async def test_good_input_reaches_the_engine(mesh: dict[str, Any], where: str, route: str,
                                             body: dict[str, Any]) -> None:
    got, answer = await post(mesh[where] + PATHS[route], body)
    assert got == 200, answer
    assert mesh["seen"] == [body]  # byte-for-byte the same JSON


@pytest.mark.parametrize("where", ["host", "worker"])
async def test_alias_is_served_as_the_model(mesh: dict[str, Any], where: str) -> None:
    got, answer = await post(mesh[where] + PATHS["chat"], chat(model=ALIAS, temperature=0.5))
    assert got == 200, answer
    # The alias became the served name on the node that took the request (the host's
    # Task handler has no aliases: a worker's alias must not reach it as such).
    assert mesh["seen"] == [chat(model=SERVED, temperature=0.5)]


async def test_models_lists_the_aliases(mesh: dict[str, Any]) -> None:
    for where in ("host", "worker"):
        async with aiohttp.ClientSession() as s, s.get(f"{mesh[where]}/v1/models") as r:
            data = (await r.json())["data"]
        assert [m["id"] for m in data] == [SERVED, ALIAS]
        assert all(m["object"] == "model" for m in data)


# ---------------------------------------------------------------- the engine's own errors
@pytest.mark.parametrize("where", ["host", "worker"])
@pytest.mark.parametrize(
    ("engine_status", "message", "status", "code"),
    [
        (500, LLAMA_PARSE_ERROR, 400, "invalid_request"),
        (500, "Failed to parse tools: Expected 'tools' to be an array, got 5; tools = 5", 400,
         "invalid_request"),
        (500, "image input is not supported - hint: if this is unexpected, you may need to "
         "provide the mmproj", 400, "invalid_request"),
        (500, "llama_decode failed: out of memory", 500, None),  # not the input: stays 5xx
        (503, "Loading model", 503, None),
        (400, "Field 'n_probs': type must be number", 400, None),  # already a 400: as is
    ],
    ids=["json type error", "tools", "image", "oom", "loading", "engine 400"],
)
async def test_engine_errors_caused_by_input_become_400(
    mesh: dict[str, Any], where: str, engine_status: int, message: str, status: int,
    code: str | None,
) -> None:
    got, answer = await post(mesh[where] + PATHS["chat"],
                             chat(x_engine=[engine_status, message]))
    assert got == status
    assert answer["error"]["message"] == message  # the engine's words are kept
    if code is not None:
        assert answer["error"]["code"] == code
        assert answer["error"]["type"] == "invalid_request_error"
    else:
        assert answer["error"]["code"] == engine_status  # llama-server's body, untouched
