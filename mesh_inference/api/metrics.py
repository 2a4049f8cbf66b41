"""Prometheus metrics of one node: ``GET /metrics`` (listed in docs/metrics.md).

Public API::

    install(app, backend, session=lambda: app[SESSION_KEY])   # create_app does this
    resp = watch_completion(request, resp)   # TTFT + generated tokens of one /v1 response
    NodeCounters(plan_changes, engine_restarts, engine_crashes)   # backend.metric_counters()

Each app owns its :class:`NodeMetrics` with its own ``CollectorRegistry`` (never
the process-wide default one), so several nodes in one process do not clash.

Most metrics are read **at scrape time** from what the node already keeps: the
status document (``backend.status()``: peers, role, plan, engine, tunnel byte
counters, RTTs) and a few event counters (``backend.metric_counters()``, when
the backend has it). Only what happens inside the gateway is instrumented
here, by a middleware and a body watcher: requests by route and status, their
latency, the time to the first token and the generated tokens.

On the host, llama-server's own ``/metrics`` (it runs with ``--metrics``) is
fetched during the scrape and appended with its ``llamacpp:`` prefix turned
into ``llamacpp_``, so one scrape target per node is enough.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mesh_inference.net.proxy import ProxiedResponse

log = logging.getLogger(__name__)

PREFIX = "mesh_inference"
ENGINE_PREFIX = "llamacpp_"
# The classic text format: every Prometheus version reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
ENGINE_SCRAPE_TIMEOUT = 2.0
MAX_ENGINE_METRICS = 1 << 20  # bytes of llama-server's /metrics we read at most
MAX_JSON_WATCH = 1 << 20  # a non-streamed answer larger than this is not parsed for usage
MAX_SSE_LINE = 1 << 20

OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})
COMPLETION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
LONG_LIVED = frozenset({"/api/events"})  # SSE: its duration is the client's patience
PEER_STATES = ("alive", "suspect", "dead", "left")
ROLES = ("host", "worker", "standby", "client")
PLAN_STATES = ("planned", "waiting", "none")
ENGINE_STATES = ("stopped", "starting", "ready", "settling", "crashed", "backoff", "waiting",
                 "unknown")
RPC_STATES = ("none", "stopped", "starting", "ready", "crashed", "backoff")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)  # fmt: skip
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

START_KEY = web.RequestKey("metrics_start", float)


@dataclass(frozen=True)
class NodeCounters:
    """Event counts the node keeps (read at scrape time, never reset)."""

    plan_changes: int = 0
    # llama-server relaunched on this node, by reason: "plan" (the plan changed while
    # one was running) or "crash" (the supervisor restarted it after it died).
    engine_restarts: Mapping[str, int] = field(default_factory=dict)
    engine_crashes: int = 0  # llama-server exits nobody asked for


StatusFn = Callable[[], dict[str, Any]]
CountersFn = Callable[[], NodeCounters]


# ---------------------------------------------------------------------- scrape-time state
def _one_of(name: str, doc: str, label: str, known: Iterable[str], current: Any) -> Metric:
    """A gauge with one series per known value: 1 for the current one, 0 for the others."""
    family = GaugeMetricFamily(name, doc, labels=[label])
    values = list(known)
    if isinstance(current, str) and current not in values:
        values.append(current)
    for value in values:
        family.add_metric([value], 1.0 if value == current else 0.0)
    return family


class StateCollector(Collector):
    """Metrics derived, at each scrape, from the status document and the node's counters."""

    def __init__(self, status: StatusFn, counters: CountersFn | None) -> None:
        self._status = status
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        try:
            st = self._status()
        except Exception as exc:  # a node not started yet, or stopping
            log.debug("no status for metrics: %s", exc)
            return
        yield from self._node(st)
        yield from self._peers(st.get("peers") or [])
        yield from self._plan(st.get("plan") or {})
        yield from self._engine(st)
        yield from self._tunnels(st.get("tunnels") or {})
        if self._counters is not None:
            yield from self._events(self._counters())

    def _node(self, st: dict[str, Any]) -> Iterator[Metric]:
        node = st.get("node") or {}
        info = InfoMetricFamily(f"{PREFIX}_node", "This node (value always 1).")
        info.add_metric([], {
            "node_id": str(node.get("id") or ""), "name": str(node.get("name") or ""),
            "mesh_id": str(st.get("mesh_id") or ""), "version": str(st.get("version") or ""),
        })  # fmt: skip
        yield info
        yield _one_of(f"{PREFIX}_node_role", "This node's role in the current plan (1 = it).",
                      "role", ROLES, node.get("role"))
        yield _one_of(f"{PREFIX}_rpc_server_state", "State of this node's rpc-server (1 = it).",
                      "state", RPC_STATES, node.get("rpc_state", "none"))
        memory = node.get("memory_bytes")
        if isinstance(memory, int | float):
            yield GaugeMetricFamily(f"{PREFIX}_node_memory_bytes",
                                    "Memory this node offers the mesh.", value=memory)

    def _peers(self, peers: list[dict[str, Any]]) -> Iterator[Metric]:
        by_state = dict.fromkeys(PEER_STATES, 0)
        for p in peers:
            state = str(p.get("status"))
            by_state[state] = by_state.get(state, 0) + 1
        family = GaugeMetricFamily(f"{PREFIX}_peers", "Peers this node knows, by state.",
                                   labels=["state"])
        for state, n in by_state.items():
            family.add_metric([state], n)
        yield family
        info = GaugeMetricFamily(f"{PREFIX}_peer_info",
                                 "Each known peer's name and role (value always 1).",
                                 labels=["peer", "name", "role"])
        up = GaugeMetricFamily(f"{PREFIX}_peer_up",
                               "1 while a known peer is alive, 0 when suspect, dead or left.",
                               labels=["peer"])
        rtt = GaugeMetricFamily(f"{PREFIX}_peer_rtt_seconds",
                                "QUIC round-trip time to each connected peer.", labels=["peer"])
        for p in peers:
            peer = str(p.get("id"))
            info.add_metric([peer, str(p.get("name") or ""), str(p.get("role") or "")], 1.0)
            up.add_metric([peer], 1.0 if p.get("status") == "alive" else 0.0)
            ms = p.get("rtt_ms")
            if isinstance(ms, int | float):
                rtt.add_metric([peer], ms / 1000)
        yield info
        yield up
        yield rtt

    def _plan(self, plan: dict[str, Any]) -> Iterator[Metric]:
        yield _one_of(f"{PREFIX}_plan_state", "State of the mesh's plan seen by this node "
                      "(1 = it).", "state", PLAN_STATES, plan.get("state", "none"))
        yield GaugeMetricFamily(f"{PREFIX}_plan_devices",
                                "Devices (nodes) in the current plan, the host included.",
                                value=len(plan.get("order") or []))

    def _engine(self, st: dict[str, Any]) -> Iterator[Metric]:
        engine = st.get("engine") or {}
        yield _one_of(f"{PREFIX}_engine_state", "State of the mesh's llama-server (on the "
                      "host), as this node sees it (1 = it).", "state", ENGINE_STATES,
                      engine.get("state", "unknown"))
        yield GaugeMetricFamily(f"{PREFIX}_ready", "1 when the mesh serves requests under "
                                "its current plan.",
                                value=1.0 if st.get("ready") else 0.0)
        startup = engine.get("startup_s")
        if isinstance(startup, int | float):
            yield GaugeMetricFamily(f"{PREFIX}_engine_startup_seconds",
                                    "Spawn to healthy of this host's running llama-server "
                                    "(its model load time).", value=startup)

    def _tunnels(self, tunnels: dict[str, dict[str, int]]) -> Iterator[Metric]:
        family = CounterMetricFamily(
            f"{PREFIX}_tunnel_bytes", "Bytes through this host's RPC tunnel to each worker: "
            "sent (llama-server to the worker) and received. Restarts at 0 when the tunnel "
            "is recreated.", labels=["peer", "direction"])
        for peer, t in tunnels.items():
            family.add_metric([peer, "sent"], t.get("bytes_up", 0))
            family.add_metric([peer, "received"], t.get("bytes_down", 0))
        yield family

    def _events(self, c: NodeCounters) -> Iterator[Metric]:
        yield CounterMetricFamily(f"{PREFIX}_plan_changes",
                                  "Times this node's plan changed (the first plan included).",
                                  value=c.plan_changes)
        restarts = CounterMetricFamily(f"{PREFIX}_engine_restarts",
                                       "llama-server relaunches on this node, by reason.",
                                       labels=["reason"])
        for reason in sorted({"plan", "crash", *c.engine_restarts}):
            restarts.add_metric([reason], c.engine_restarts.get(reason, 0))
        yield restarts
        yield CounterMetricFamily(f"{PREFIX}_engine_crashes",
                                  "Unexpected exits of this node's llama-server.",
                                  value=c.engine_crashes)


# ---------------------------------------------------------------------- llama-server's own
class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _engine_name(name: str) -> str:
    if name.startswith("llamacpp:"):
        name = name[len("llamacpp:"):]
    elif name.startswith(ENGINE_PREFIX):
        name = name[len(ENGINE_PREFIX):]
    return ENGINE_PREFIX + name.replace(":", "_")


def rename_engine_metrics(text: str) -> list[Metric]:
    """llama-server's exposition text as families named ``llamacpp_*`` (``ValueError`` if bad)."""
    out: list[Metric] = []
    for family in text_string_to_metric_families(text):
        new = Metric(_engine_name(family.name), family.documentation, family.type)
        for s in family.samples:
            suffix = s.name[len(family.name):] if s.name.startswith(family.name) else ""
            new.add_sample(new.name + suffix, dict(s.labels), s.value, s.timestamp)
        out.append(new)
    return out


async def scrape_engine(session: aiohttp.ClientSession, engine_url: str) -> list[Metric]:
    """llama-server's metrics (renamed), and whether it answered: ``…_engine_metrics_up``."""
    up = GaugeMetricFamily(f"{PREFIX}_engine_metrics_up",
                           "1 when this host's llama-server answered its /metrics.")
    families: list[Metric] = []
    try:
        async with session.get(
            engine_url + METRICS_PATH, timeout=aiohttp.ClientTimeout(total=ENGINE_SCRAPE_TIMEOUT)
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            raw = await resp.content.read(MAX_ENGINE_METRICS + 1)
        if len(raw) > MAX_ENGINE_METRICS:
            raise ValueError("too large")
        families = rename_engine_metrics(raw.decode("utf-8"))
    except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
        log.debug("llama-server metrics unavailable: %s", exc)
        families = []
        up.add_metric([], 0.0)
    else:
        up.add_metric([], 1.0)
    return [up, *families]


# ---------------------------------------------------------------------- request metrics
def route_label(request: web.Request) -> str:
    """A bounded label for a request's route (never the raw path of an unknown one)."""
    path = request.path
    if path == "/v1" or path.startswith("/v1/"):
        return path if path in OPENAI_ROUTES else "/v1/other"
    resource = request.match_info.route.resource
    if resource is None:
        return "other"
    if isinstance(resource, web.StaticResource):
        return "console"
    return resource.canonical


class NodeMetrics:
    """One node's registry: scrape-time state plus the gateway's request metrics."""

    def __init__(self, status: StatusFn, counters: CountersFn | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StateCollector(status, counters))
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests this node's gateway "
                                "answered, by route and status.", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds",
                                 "Request to the end of the response (streams included; not "
                                 "/api/events).", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Request to the first content chunk of a streamed completion.",
                              ["route"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.tokens = Counter(f"{PREFIX}_generated_tokens", "Completion tokens answered through "
                              "this node's gateway (see docs/metrics.md for how they are "
                              "counted).", ["route"], registry=self.registry)

    def render(self, extra: Iterable[Metric] = ()) -> bytes:
        """The exposition text: this registry, then ``extra`` (llama-server's families)."""
        text = generate_latest(self.registry)
        families = list(extra)
        if families:
            text += generate_latest(_Families(families))
        return text

    @web.middleware
    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Any],
    ) -> web.StreamResponse:
        """Outermost: counts every request, those the access guard refuses included."""
        start = time.perf_counter()
        request[START_KEY] = start
        route = route_label(request)
        status = 500
        try:
            resp: web.StreamResponse = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away first (nginx's "client closed request")
            raise
        finally:
            self.requests.labels(route, str(status)).inc()
            if route not in LONG_LIVED:
                self.latency.labels(route).observe(time.perf_counter() - start)


METRICS_KEY = web.AppKey("metrics", NodeMetrics)


# ---------------------------------------------------------------------- completions
class _SSECounter:
    """Counts the content chunks of an OpenAI SSE stream, fed bytes as they pass."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.chunks = 0
        self.usage: int | None = None
        self.broken = False

    def feed(self, data: bytes) -> bool:
        """True if ``data`` completed at least one content chunk."""
        if self.broken:
            return False
        self.buffer += data
        *lines, rest = self.buffer.split(b"\n")
        self.buffer = bytearray(rest)
        if len(self.buffer) > MAX_SSE_LINE:
            self.broken = True  # not SSE as we know it: stop looking
            return False
        before = self.chunks
        for line in lines:
            self._line(bytes(line).strip())
        return self.chunks > before

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        usage = _completion_tokens(event)
        if usage is not None:
            self.usage = usage
        choices = event.get("choices")
        if isinstance(choices, list) and any(_has_content(c) for c in choices):
            self.chunks += 1


def _has_content(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return any(isinstance(delta.get(k), str) and delta[k]
                   for k in ("content", "reasoning_content"))
    text = choice.get("text")  # /v1/completions
    return isinstance(text, str) and bool(text)


def _completion_tokens(body: dict[str, Any]) -> int | None:
    """The answer's own count: OpenAI ``usage``, else llama-server's ``timings``."""
    for key, field_name in (("usage", "completion_tokens"), ("timings", "predicted_n")):
        part = body.get(key)
        if isinstance(part, dict):
            n = part.get(field_name)
            if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                return n
    return None


def watch_completion(request: web.Request, resp: ProxiedResponse) -> ProxiedResponse:
    """``resp`` with its body observed: TTFT of streams, generated tokens of 200 answers."""
    metrics = request.app.get(METRICS_KEY)
    route = request.path
    if metrics is None or route not in COMPLETION_ROUTES or resp.status != 200:
        return resp
    start = request.get(START_KEY, time.perf_counter())
    ctype = next((v for k, v in resp.headers if k.lower() == "content-type"), "")
    streamed = ctype.startswith("text/event-stream")
    return ProxiedResponse(resp.status, resp.headers,
                           _watched(metrics, route, start, streamed, resp.body_iter))


async def _watched(
    metrics: NodeMetrics, route: str, start: float, streamed: bool, body: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    sse = _SSECounter()
    seen = False
    kept = bytearray()
    try:
        async for chunk in body:
            if streamed:
                if sse.feed(chunk) and not seen:
                    seen = True
                    metrics.ttft.labels(route).observe(time.perf_counter() - start)
            elif len(kept) <= MAX_JSON_WATCH:
                kept += chunk
            yield chunk
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
        tokens: int | None
        if streamed:
            tokens = sse.usage if sse.usage is not None else sse.chunks
        else:
            tokens = None
            if len(kept) <= MAX_JSON_WATCH:
                try:
                    parsed = json.loads(kept)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    tokens = _completion_tokens(parsed)
        if tokens:
            metrics.tokens.labels(route).inc(tokens)


# ---------------------------------------------------------------------- the route
def install(
    app: web.Application, backend: Any, session: Callable[[], aiohttp.ClientSession]
) -> NodeMetrics:
    """Give ``app`` its own registry, the counting middleware (outermost) and ``/metrics``.

    ``backend`` needs ``status()`` and ``engine_url()``; ``metric_counters()`` is optional.
    Call before the access guard is installed, so refused requests are counted too.
    """
    counters = getattr(backend, "metric_counters", None)
    metrics = NodeMetrics(backend.status, counters if callable(counters) else None)
    app[METRICS_KEY] = metrics
    app.middlewares.insert(0, metrics.middleware)

    async def serve(request: web.Request) -> web.Response:
        url = backend.engine_url()
        extra = await scrape_engine(session(), url) if url else []
        return web.Response(body=metrics.render(extra),
                            headers={"content-type": CONTENT_TYPE, "cache-control": "no-store"})

    app.router.add_get(METRICS_PATH, serve)
    return metrics
