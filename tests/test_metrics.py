"""``GET /metrics``: the real gateway on loopback, and a real in-process mesh.

The gateway tests run the real aiohttp app in front of a real aiohttp
"llama-server" (JSON answers with ``usage``, SSE streams, and its own
``/metrics``); the mesh test runs three real Nodes (real QUIC, tunnels and
gateways, the stand-in engine of tests/standin_engine.py) and reads their
peers, roles, plan and tunnels back from each node's own registry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gatewaymesh import start
from ggufs import tiny_gguf
from prometheus_client.parser import text_string_to_metric_families
from test_node_inprocess import make_node, ready_with, until

from mesh_inference.api.gateway import create_app
from mesh_inference.api.metrics import (
    NodeCounters,
    _SSECounter,
    rename_engine_metrics,
)
from mesh_inference.node import Node

pytestmark = pytest.mark.timeout(60)
TOKEN = "t" * 43
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
P = "mesh_inference_"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


async def scrape(url: str, **headers: str) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse(await r.text())


# ---------------------------------------------------------------- units
def test_sse_counter_counts_content_chunks_across_any_split() -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},  # no content: not a token
        {"choices": [{"index": 0, "delta": {"content": "The"}}]},
        {"choices": [{"index": 0, "delta": {"content": " capitäl"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]},
        {"choices": [{"index": 0, "text": "x"}]},  # /v1/completions
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    raw = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events).encode() + b"data: [DONE]\n\n"
    for size in (1, 3, 7, len(raw)):
        counter = _SSECounter()
        for i in range(0, len(raw), size):
            counter.feed(raw[i : i + size])
        assert counter.chunks == 4 and counter.usage is None


@pytest.mark.parametrize("last", [
    b'{"choices":[],"usage":{"completion_tokens":12}}',
    # llama-server's last chunk: no usage unless asked, but its timings count every token
    b'{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
    b'"timings":{"prompt_n":31,"predicted_n":12}}',
])
def test_sse_counter_prefers_the_streams_own_count(last: bytes) -> None:
    counter = _SSECounter()
    assert counter.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    assert not counter.feed(b"data: " + last + b"\n\n")
    assert not counter.feed(b"data: not json\n\n: comment\n\ndata: [DONE]\n\n")
    assert (counter.chunks, counter.usage) == (1, 12)


def test_llama_server_metrics_are_renamed() -> None:
    text = (
        "# HELP llamacpp:prompt_tokens_total Prompt tokens.\n"
        "# TYPE llamacpp:prompt_tokens_total counter\n"
        "llamacpp:prompt_tokens_total 42\n"
        "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage.\n"
        "# TYPE llamacpp:kv_cache_usage_ratio gauge\n"
        "llamacpp:kv_cache_usage_ratio 0.5\n"
        "# HELP llamacpp:n_tokens_max Largest observed sequence length\n"
        "# TYPE llamacpp:n_tokens_max counter\n"  # a counter without _total, as llama-server
        "llamacpp:n_tokens_max 35\n"
    )
    got = {s.name: s.value for f in rename_engine_metrics(text) for s in f.samples}
    assert got == {"llamacpp_prompt_tokens_total": 42, "llamacpp_kv_cache_usage_ratio": 0.5,
                   "llamacpp_n_tokens_max_total": 35}


# ---------------------------------------------------------------- the gateway
def fake_llama() -> web.Application:
    """Speaks like llama-server --metrics: JSON with usage, SSE chunks, and /metrics."""
    app = web.Application()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Paris."},
                 "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}
        await resp.write(f"data: {json.dumps(first)}\n\n".encode())
        for word in ["The ", "capital ", "is ", "Paris."]:
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="# HELP llamacpp:requests_processing Busy slots.\n"
                                 "# TYPE llamacpp:requests_processing gauge\n"
                                 "llamacpp:requests_processing 1\n")

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    return app


class Backend:
    """The node as the gateway sees it, with a status document of a 3-node mesh."""

    def __init__(self, engine: str | None) -> None:
        self.engine = engine

    def status(self) -> dict[str, Any]:
        return {
            "node": {"id": "a" * 16, "name": "box", "role": "host", "rpc_state": "ready",
                     "memory_bytes": 4 << 30},
            "mesh_id": "m" * 16, "version": "0.1.0", "ready": True,
            "engine": {"state": "ready", "startup_s": 1.5},
            "plan": {"state": "planned", "order": ["b" * 16, "c" * 16, "a" * 16]},
            "peers": [
                {"id": "b" * 16, "name": "b", "role": "worker", "status": "alive",
                 "rtt_ms": 1.5},
                {"id": "c" * 16, "name": "c", "role": "worker", "status": "suspect",
                 "rtt_ms": None},
            ],
            "tunnels": {"b" * 16: {"port": 1, "bytes_up": 100, "bytes_down": 20}},
        }  # fmt: skip

    def metric_counters(self) -> NodeCounters:
        return NodeCounters(plan_changes=3, engine_restarts={"plan": 2}, engine_crashes=1)

    def engine_url(self) -> str | None:
        return self.engine

    def is_host(self) -> bool:
        return True

    def served_model(self) -> str | None:
        return "m"

    async def open_host_stream(self) -> tuple[Any, Any]:
        raise AssertionError("this node is the host")

    async def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "status", self.status()


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, Backend]]:
    r1, llama = await start(fake_llama())
    backend = Backend(llama)
    r2, url = await start(create_app(backend, console_dir=None, console_token=TOKEN))
    yield url, backend
    await r2.cleanup()
    await r1.cleanup()


async def test_metrics_reflect_the_status_document(gateway: tuple[str, Backend]) -> None:
    url, _ = gateway
    m = await scrape(url)
    assert value(m, f"{P}node_info", node_id="a" * 16, name="box", mesh_id="m" * 16,
                 version="0.1.0") == 1
    assert value(m, f"{P}node_role", role="host") == 1
    assert value(m, f"{P}node_role", role="worker") == 0
    assert value(m, f"{P}peers", state="alive") == 1
    assert value(m, f"{P}peers", state="suspect") == 1
    assert value(m, f"{P}peers", state="dead") == 0
    assert value(m, f"{P}peer_rtt_seconds", peer="b" * 16) == pytest.approx(0.0015)
    assert value(m, f"{P}peer_rtt_seconds", peer="c" * 16) is None
    assert value(m, f"{P}peer_up", peer="b" * 16) == 1
    assert value(m, f"{P}peer_up", peer="c" * 16) == 0
    assert value(m, f"{P}peer_info", peer="c" * 16, name="c", role="worker") == 1
    assert value(m, f"{P}plan_state", state="planned") == 1
    assert value(m, f"{P}plan_devices") == 3
    assert value(m, f"{P}plan_changes_total") == 3
    assert value(m, f"{P}engine_restarts_total", reason="plan") == 2
    assert value(m, f"{P}engine_restarts_total", reason="crash") == 0
    assert value(m, f"{P}engine_crashes_total") == 1
    assert value(m, f"{P}engine_state", state="ready") == 1
    assert value(m, f"{P}engine_startup_seconds") == 1.5
    assert value(m, f"{P}ready") == 1
    assert value(m, f"{P}tunnel_bytes_total", peer="b" * 16, direction="sent") == 100
    assert value(m, f"{P}tunnel_bytes_total", peer="b" * 16, direction="received") == 20
    # llama-server's own metrics, folded in under llamacpp_
    assert value(m, f"{P}engine_metrics_up") == 1
    assert value(m, "llamacpp_requests_processing") == 1


async def test_request_counters_latency_ttft_and_tokens_move(
    gateway: tuple[str, Backend],
) -> None:
    url, _ = gateway
    chat = "/v1/chat/completions"
    before = await scrape(url)
    assert value(before, f"{P}generated_tokens_total", route=chat) is None
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(f"{url}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3
        async with s.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert "Paris." in await r.text()
        async with s.post(f"{url}/v1/chat/completions", json={"messages": []}) as r:
            assert r.status == 400
        async with s.get(f"{url}/v1/nope/{'x' * 50}") as r:
            assert r.status == 404
        async with s.get(f"{url}/health", headers={"host": "evil.example"}) as r:
            assert r.status == 403  # refused by the guard, and still counted
        async with s.get(f"{url}/no/such/page") as r:
            assert r.status == 404
    m = await scrape(url)
    requests = f"{P}http_requests_total"
    assert value(m, requests, route=chat, status="200") == 3
    assert value(m, requests, route=chat, status="400") == 1
    assert value(m, requests, route="/v1/other", status="404") == 1
    assert value(m, requests, route="/health", status="403") == 1
    assert value(m, requests, route="other", status="404") == 1
    assert value(m, requests, route="/metrics", status="200") == 1  # the first scrape
    # 2 answers x usage.completion_tokens 3, plus 4 content chunks of the stream
    assert value(m, f"{P}generated_tokens_total", route=chat) == 10
    assert value(m, f"{P}http_request_duration_seconds_count", route=chat) == 4
    assert value(m, f"{P}time_to_first_token_seconds_count", route=chat) == 1
    ttft = value(m, f"{P}time_to_first_token_seconds_sum", route=chat)
    total = value(m, f"{P}http_request_duration_seconds_sum", route=chat)
    assert ttft is not None and total is not None and 0 < ttft < total
    # No raw path ever becomes a label.
    assert not any("nope" in v or "such" in v for _, labels in m for _, v in labels)


async def test_metrics_without_an_engine_and_per_app_registries() -> None:
    """Two gateways in one process keep separate registries; no engine → no llamacpp_."""
    apps = [create_app(Backend(None), console_dir=None, console_token=TOKEN) for _ in range(2)]
    (r1, u1), (r2, u2) = [await start(app) for app in apps]
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{u1}/health") as r:
            assert r.status == 200
        m1, m2 = await scrape(u1), await scrape(u2)
        assert value(m1, f"{P}http_requests_total", route="/health", status="200") == 1
        assert value(m2, f"{P}http_requests_total", route="/health", status="200") is None
        assert value(m1, f"{P}engine_metrics_up") is None
        assert not any(name.startswith("llamacpp_") for name, _ in m1)
    finally:
        await r2.cleanup()
        await r1.cleanup()


async def test_metrics_take_a_console_bearer_and_refuse_a_wrong_one(
    gateway: tuple[str, Backend],
) -> None:
    url, _ = gateway
    await scrape(url, authorization=f"Bearer {TOKEN}")
    async with aiohttp.ClientSession() as s, s.get(
        f"{url}/metrics", headers={"authorization": "Bearer wrong"}
    ) as r:
        assert r.status == 401


async def test_with_an_api_key_metrics_need_it() -> None:
    app = create_app(Backend(None), console_dir=None, console_token=TOKEN, api_key="k-123")
    runner, url = await start(app)
    try:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"authorization": "Bearer nope"},
                            {"authorization": f"Bearer {TOKEN}"}):  # the console login is not it
                async with s.get(f"{url}/metrics", headers=headers) as r:
                    assert r.status == 401
                    assert (await r.json())["error"]["code"] == "invalid_api_key"
            async with s.get(f"{url}/health") as r:
                assert r.status == 200  # /health stays open
        m = await scrape(url, authorization="Bearer k-123")
        assert value(m, f"{P}http_requests_total", route="/metrics", status="401") == 3
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- a real mesh
@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[list[Node]]:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    nodes = [make_node(tmp_path, "a", 4, model_ref=str(model))]
    await nodes[0].start()
    for name, gib in (("b", 2), ("c", 1)):
        node = make_node(tmp_path, name, gib, join=nodes[0].join_token)
        nodes.append(node)
        await node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def test_a_real_mesh_reads_back_from_each_nodes_metrics(mesh: list[Node]) -> None:
    a, b, c = mesh
    await until(lambda: all(ready_with(n, 3) for n in mesh), "3-device plan ready everywhere")
    # A request through worker c's gateway, forwarded to host a over QUIC.
    async with aiohttp.ClientSession() as s, s.post(
        f"{c.http_url}/v1/chat/completions", json=CHAT
    ) as r:
        assert r.status == 200
    ma, mc = await scrape(a.http_url), await scrape(c.http_url)

    assert value(ma, f"{P}node_role", role="host") == 1
    assert value(mc, f"{P}node_role", role="worker") == 1
    for m, me in ((ma, a), (mc, c)):
        assert any(name == f"{P}node_info" and ("node_id", me.node_id) in labels
                   for name, labels in m)
        assert value(m, f"{P}peers", state="alive") == 2
        assert value(m, f"{P}plan_state", state="planned") == 1
        assert value(m, f"{P}plan_devices") == 3
        assert (value(m, f"{P}plan_changes_total") or 0) >= 1
        assert value(m, f"{P}engine_state", state="ready") == 1
        assert value(m, f"{P}ready") == 1
        assert value(m, f"{P}rpc_server_state", state="ready") == 1
    for peer in (b.node_id, c.node_id):
        assert (value(ma, f"{P}peer_rtt_seconds", peer=peer) or 0) > 0
        assert (value(ma, f"{P}tunnel_bytes_total", peer=peer, direction="sent") or 0) > 0
        assert (value(ma, f"{P}tunnel_bytes_total", peer=peer, direction="received") or 0) > 0
    assert not any(name == f"{P}tunnel_bytes_total" for name, _ in mc)  # only the host's
    # The request counts where it entered; its tokens come from the answer's usage.
    chat = "/v1/chat/completions"
    assert value(mc, f"{P}http_requests_total", route=chat, status="200") == 1
    assert value(mc, f"{P}generated_tokens_total", route=chat) == 7
    assert value(ma, f"{P}http_requests_total", route=chat, status="200") is None
    # The host's engine (the stand-in answers /metrics as llama-server does) served it.
    assert value(ma, f"{P}engine_metrics_up") == 1
    assert value(ma, "llamacpp_requests_served_total") == 1
    assert value(mc, f"{P}engine_metrics_up") is None

    # c leaves: a re-plans on two devices and relaunches its engine.
    changes = value(ma, f"{P}plan_changes_total") or 0
    await c.stop()
    await until(lambda: ready_with(a, 2), "re-planned without c")
    ma = await scrape(a.http_url)
    assert value(ma, f"{P}peers", state="left") == 1
    assert value(ma, f"{P}peers", state="alive") == 1
    assert value(ma, f"{P}plan_devices") == 2
    assert (value(ma, f"{P}plan_changes_total") or 0) > changes
    assert (value(ma, f"{P}engine_restarts_total", reason="plan") or 0) >= 1
    assert value(ma, f"{P}tunnel_bytes_total", peer=c.node_id, direction="sent") is None
