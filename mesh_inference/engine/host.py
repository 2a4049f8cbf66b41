"""The host controller: tunnels to the plan's workers and llama-server over them.

Public API::

    host = HostController(backend, state_dir=..., open_tunnel=f(worker_id) -> (reader, writer),
                          local_rpc_port=lambda: worker.port, ctx_size=4096, threads=4,
                          on_state=f(state, detail),
                          transforms_for=f(worker_id) -> TransformFactory,  # RPC-aware tunnels
                          on_worker_failure=f(worker_id, reason),   # feeds core/quarantine.py
                          settle=1.5, settle_cap=6.0)  # a growing plan waits to settle
    host.apply(plan, model_path, alias)   # schedules; returns at once
    host.settling                         # a growth waits to be applied
    await host.settled()                  # until every scheduled application ran
    host.drop_worker(worker_id)           # a worker died: close its tunnel now
    host.state; host.detail; host.url     # url only while llama-server serves
                                          # (state "ready", or "settling": see below)
    host.tunnel_stats() -> {worker_id: {"port", "bytes_up", "bytes_down"}}
    host.restarts -> {"plan": n, "crash": n}; host.crashes   # for /metrics
    await host.stop()

State lives here: the tunnel listeners (one 127.0.0.1 port per worker, the
``--rpc`` endpoints llama-server dials) and the llama-server supervisor.
Applications run one at a time, and one superseded while it waited is
skipped, so a burst of membership changes costs one relaunch. Where the
plan keeps a worker, its tunnel port stays the same across relaunches.

A plan that only *adds* workers to the one the running engine (loading or
ready) was launched with waits until the plan has been quiet for ``settle``
seconds (at most ``settle_cap`` after the first such change) before it
relaunches: nodes joining one after another (a mesh starting: 1, then 2,
then 3 devices) cost one relaunch, and the engine keeps serving meanwhile
(state "settling" instead of "ready": it serves, but not the current plan).
Anything else applies at once -- a plan without a worker the engine uses
(a death: failover time matters), another host or model, or no engine
running -- and supersedes a growth still waiting. A plan equal to the one
the running engine was launched with is not relaunched.

Failures it can pin on a worker go to ``on_worker_failure``: a tunnel stream
to it that cannot be opened, and a llama-server crash whose last log lines
name that worker's tunnel endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mesh_inference.core.plan import Plan
from mesh_inference.engine.backends import EngineBackend
from mesh_inference.engine.supervisor import (
    EngineExited,
    EngineReady,
    EngineRestartScheduled,
    EngineStarting,
    ProcessSupervisor,
    SupervisorEvent,
)
from mesh_inference.net.addresses import free_tcp_port
from mesh_inference.net.tunnel import Transform, TransformFactory, TunnelListener

log = logging.getLogger(__name__)

TunnelOpener = Callable[[str], Awaitable[tuple[asyncio.StreamReader, Any]]]
RELAUNCH_GRACE = 0.5  # seconds a replaced llama-server gets after SIGTERM (see _launch)
SETTLE_S = 1.5  # quiet time a growing plan waits for before it relaunches the engine
SETTLE_CAP_S = 6.0  # nodes that keep joining postpone a growth at most this long
_RUNNING = ("starting", "ready")  # supervisor states with an engine process up
_FAILURE_WORDS = re.compile(r"fail|error|abort|refused|reset|closed|lost|unreachable", re.I)


class HostController:
    def __init__(
        self,
        backend: EngineBackend,
        *,
        state_dir: Path,
        open_tunnel: TunnelOpener,
        local_rpc_port: Callable[[], int],
        ctx_size: int,
        threads: int,
        on_state: Callable[[str, str], None],
        transforms_for: Callable[[str], TransformFactory] | None = None,
        on_worker_failure: Callable[[str, str], None] | None = None,
        settle: float = SETTLE_S,
        settle_cap: float = SETTLE_CAP_S,
    ) -> None:
        self._backend = backend
        self._settle = settle
        self._settle_cap = settle_cap
        self._on_worker_failure = on_worker_failure
        self._transforms_for = transforms_for
        self._state_dir = state_dir
        self._open_tunnel = open_tunnel
        self._local_rpc_port = local_rpc_port
        self._ctx_size = ctx_size
        self._threads = threads
        self._on_state = on_state
        self._tunnels: dict[str, TunnelListener] = {}
        self._engine: ProcessSupervisor | None = None
        self._port = 0
        self._lock = asyncio.Lock()
        self._wanted: tuple[Plan, Path, str] | None = None
        self._launched: tuple[Plan, Path, str] | None = None  # what the engine was started with
        self._growing_since: float | None = None  # loop time of the first growth still waiting
        self._waiting: asyncio.Task[None] | None = None  # that growth's application, asleep
        self._ready_detail = ""
        self._generation = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._idle = ("stopped", "not the host")
        self.state = "stopped"
        self.detail = ""
        self.startup_s: float | None = None  # spawn → healthy, of the running llama-server
        # llama-server relaunches: "plan" replaced a live one, "crash" restarted a dead one.
        self.restarts = {"plan": 0, "crash": 0}
        self.crashes = 0  # exits nobody asked for
        self._crash_restart_due = False

    @property
    def url(self) -> str | None:
        # "settling": the engine serves while a bigger plan waits to replace it.
        serving = self.state in ("ready", "settling")
        return f"http://127.0.0.1:{self._port}" if serving else None

    def _set_state(self, state: str, detail: str = "") -> None:
        if (state, detail) != (self.state, self.detail):
            self.state, self.detail = state, detail
            self._on_state(state, detail)

    # -- scheduling
    def apply(
        self,
        plan: Plan | None,
        model: Path | None = None,
        alias: str = "model",
        *,
        idle: tuple[str, str] = ("stopped", "not the host"),
    ) -> None:
        """Serve ``model`` under ``plan`` (this node being its host), or stop.

        Without a plan or a model the engine stops and the state becomes
        ``idle`` (e.g. ``("waiting", "needs 3 GB more")``).
        """
        self._generation += 1
        self._wanted = (plan, model, alias) if plan is not None and model is not None else None
        self._idle = idle
        if self._waiting is not None:  # a growth still waiting: superseded
            self._waiting.cancel()
            self._waiting = None
        delay = self._settle_delay(self._wanted)
        if delay > 0 and plan is not None:
            log.info("host: the plan grows to %d devices: relaunching once it has not changed "
                     "for %.1f s", len(plan.workers) + 1, delay)  # fmt: skip
            self._show_serving()
        task = asyncio.ensure_future(self._apply(self._generation, delay))
        if delay > 0:
            self._waiting = task
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @property
    def settling(self) -> bool:
        """A plan that adds workers waits for the membership to settle before it applies."""
        return self._growing_since is not None

    def _engine_running(self) -> bool:
        return self._engine is not None and self._engine.state in _RUNNING

    def _grows(self, wanted: tuple[Plan, Path, str] | None) -> bool:
        """``wanted`` only adds workers to what the running engine was launched with."""
        launched = self._launched
        if wanted is None or launched is None or not self._engine_running():
            return False
        (plan, model, alias), (was, was_model, was_alias) = wanted, launched
        same = (model, alias, plan.host_id) == (was_model, was_alias, was.host_id)
        return same and set(plan.workers) > set(was.workers)

    def _runs(self, wanted: tuple[Plan, Path, str]) -> bool:
        """The running engine was launched with ``wanted`` and its tunnels are all there."""
        return (
            wanted == self._launched
            and self._engine_running()
            and all(w in self._tunnels for w in wanted[0].workers)
        )

    def _serving(self) -> tuple[str, str]:
        """State and detail of a ready engine: "settling" while a growth waits to replace it."""
        if self._growing_since is None or self._wanted is None or self._launched is None:
            return "ready", self._ready_detail
        now, then = len(self._launched[0].workers) + 1, len(self._wanted[0].workers) + 1
        return "settling", f"serving on {now} devices; {then} once the plan settles"

    def _show_serving(self) -> None:
        if self._engine is not None and self._engine.state == "ready":
            self._set_state(*self._serving())

    def _settle_delay(self, wanted: tuple[Plan, Path, str] | None) -> float:
        """How long ``wanted`` waits before it applies: 0 unless it is a growth."""
        if self._settle <= 0 or not self._grows(wanted):
            self._growing_since = None
            return 0.0
        now = asyncio.get_running_loop().time()
        if self._growing_since is None:
            self._growing_since = now
        return max(0.0, min(self._settle, self._growing_since + self._settle_cap - now))

    async def settled(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _apply(self, generation: int, delay: float = 0.0) -> None:
        if delay > 0:
            await asyncio.sleep(delay)  # a later apply() cancels this one meanwhile
            self._waiting = None
            if generation != self._generation:
                return
            self._growing_since = None
        async with self._lock:
            if generation != self._generation:
                return  # superseded while queued
            try:
                if self._wanted is None:
                    self._launched = None
                    await self._stop_engine(*self._idle)
                    await self._close_tunnels(keep=())
                elif self._runs(self._wanted):
                    self._show_serving()  # e.g. a growth that waited was undone
                else:
                    await self._launch(*self._wanted, generation=generation)
            except Exception as exc:  # one bad launch must not stop the next one
                log.exception("applying the plan failed")
                self._set_state("crashed", f"launch failed: {exc}")

    async def _launch(self, plan: Plan, model: Path, alias: str, *, generation: int) -> None:
        endpoints: list[str] = []
        for worker in plan.workers:
            tunnel = self._tunnels.get(worker)
            if tunnel is None:
                tunnel = TunnelListener(self._opener(worker), transforms=self._transforms(worker))
                await tunnel.start("127.0.0.1", 0)
                self._tunnels[worker] = tunnel
            endpoints.append(f"127.0.0.1:{tunnel.port}")
        await self._close_tunnels(keep=plan.workers)
        # The host's own device comes last, so the logits never cross the network.
        endpoints.append(f"127.0.0.1:{self._local_rpc_port()}")
        if generation != self._generation:
            return
        if not self._port:
            self._port = free_tcp_port()
        argv = self._backend.llama_server_command(
            model=model,
            rpc_endpoints=endpoints,
            tensor_split=list(plan.tensor_split),
            port=self._port,
            ctx_size=self._ctx_size,
            threads=self._threads,
            alias=alias,
        )
        if self._engine is None:
            self._engine = ProcessSupervisor(
                "llama-server",
                log_path=self._state_dir / "llama-server.log",
                health_url=f"http://127.0.0.1:{self._port}{self._backend.health_path}",
                on_event=self._on_event,
            )
        if self._engine.state != "stopped":
            self.restarts["plan"] += 1
        self._crash_restart_due = False  # a relaunch supersedes the supervisor's restart
        self._set_state("starting", f"{len(plan.workers) + 1} devices")
        self._launched = (plan, model, alias)
        # A llama-server busy generating ignores SIGTERM (measured: still running 20 s
        # later), and every relaunch would wait out the grace: streams cut by the
        # relaunch are continued by the gateway that received them (api/continuity.py).
        await self._engine.start(argv, self._backend.env(), stop_timeout=RELAUNCH_GRACE)

    def _transforms(self, worker: str) -> TransformFactory | None:
        if self._transforms_for is None:
            return None
        pick = self._transforms_for

        def make() -> tuple[Transform, Transform]:
            # Decided per connection: the worker's announced model digest may change.
            return pick(worker)()

        return make

    def _opener(self, worker: str) -> Callable[[], Awaitable[tuple[asyncio.StreamReader, Any]]]:
        async def open_stream() -> tuple[asyncio.StreamReader, Any]:
            try:
                return await self._open_tunnel(worker)
            except Exception as exc:
                self._worker_failed(worker, f"a tunnel to it could not be opened: {exc}")
                raise

        return open_stream

    def _worker_failed(self, worker: str, reason: str) -> None:
        log.warning("host: worker %s failed: %s", worker, reason)
        if self._on_worker_failure is not None:
            try:
                self._on_worker_failure(worker, reason)
            except Exception:
                log.exception("on_worker_failure failed")

    def _blame_crash(self, log_tail: str) -> None:
        """llama-server died: blame the workers whose tunnel endpoint its last words name.

        ggml's RPC client says e.g. "Failed to connect to 127.0.0.1:PORT" or "RPC
        handshake failed for 127.0.0.1:PORT" before it aborts.
        """
        # This run's output only: after the supervisor's "--- <time> starting <argv>" line
        # (the argv names every endpoint).
        run = log_tail.rsplit("\n--- ", 1)[-1].partition("\n")[2]
        for worker, tunnel in list(self._tunnels.items()):
            endpoint = re.compile(rf"127\.0\.0\.1:{tunnel.port}(?!\d)")
            for line in run.splitlines():
                if endpoint.search(line) and _FAILURE_WORDS.search(line):
                    self._worker_failed(worker, f"llama-server crashed: {line.strip()[:160]}")
                    break

    async def _close_tunnels(self, keep: tuple[str, ...]) -> None:
        for stale in set(self._tunnels) - set(keep):
            await self._tunnels.pop(stale).close()

    def drop_worker(self, worker: str) -> None:
        """A worker is gone: its tunnel's connections can only fail now."""
        tunnel = self._tunnels.pop(worker, None)
        if tunnel is not None:
            task = asyncio.ensure_future(tunnel.close())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _stop_engine(self, state: str, why: str) -> None:
        if self._engine is not None and self._engine.state != "stopped":
            log.info("stopping llama-server: %s", why)
            await self._engine.stop()
        self._set_state(state, why)

    def _on_event(self, event: SupervisorEvent) -> None:
        log.info("host: %s", event)
        if isinstance(event, EngineRestartScheduled):
            self._crash_restart_due = True
        elif isinstance(event, EngineStarting) and self._crash_restart_due:
            self._crash_restart_due = False
            self.restarts["crash"] += 1
        if isinstance(event, EngineReady):
            self.startup_s = event.startup_s
            self._ready_detail = f"ready in {event.startup_s:.2f} s"
            self._set_state(*self._serving())
        elif isinstance(event, EngineExited):
            if not event.expected:
                self.crashes += 1
                self._set_state("crashed", f"exit code {event.returncode}")
                self._blame_crash(event.log_tail)
                if self._growing_since is not None and self._wanted is not None:
                    # Nothing serves any more: the growth that waited applies now.
                    self.apply(*self._wanted, idle=self._idle)
        elif self._engine is not None:
            self._set_state(self._engine.state, self.detail)

    def tunnel_stats(self) -> dict[str, dict[str, int]]:
        return {
            wid: {"port": t.port, "bytes_up": t.bytes_up, "bytes_down": t.bytes_down}
            for wid, t in self._tunnels.items()
        }

    async def stop(self) -> None:
        self._generation += 1
        self._wanted = None
        self._growing_since = None
        self._waiting = None
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*list(self._pending), return_exceptions=True)
        if self._engine is not None:
            await self._engine.stop()
        await self._close_tunnels(keep=())
