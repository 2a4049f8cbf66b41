"""The composition root: builds one of each part and wires their events together.

::

    node = Node(NodeConfig(state_dir=..., model_ref=..., join=...), io=NodeIO(...))
    await node.start(); node.status(); await node.stop()

The parts and what they own:

- ``core.membership.Membership`` -- who is alive (fed frames and ``now``);
- ``core.meshmodel`` -- which model, which plan (pure functions of members);
- ``models.local.LocalModel`` -- this node's file of the mesh model;
- ``models.transfer`` -- that file copied from a peer (``ModelFetcher``), or to one
  (``FileServer``);
- ``net.endpoint.MeshEndpoint`` -- authenticated QUIC connections and streams;
- ``net.dialer.Dialer`` -- bootstrap, gossip and mDNS dials with back-off;
- ``engine.worker.WorkerService`` -- the local rpc-server; tunnels only from the host;
- ``engine.host.HostController`` -- tunnels + llama-server when this node hosts;
- ``api`` -- the HTTP gateway, status document and event bus.

The node holds no state of its own beyond references to them and the
current plan. Everything it touches in the outside world comes from
:class:`NodeIO` (engine backend, memory, mDNS), so tests build several nodes
in one event loop with a small stand-in engine process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh_inference import __version__
from mesh_inference.api.console import add_model_routes
from mesh_inference.api.drain import Drain, shutting_down
from mesh_inference.api.events import EventBus
from mesh_inference.api.gateway import NoHostError, create_app
from mesh_inference.api.metrics import NodeCounters
from mesh_inference.api.openai import make_task_handler
from mesh_inference.api.security import own_host_names, public_bind_problem
from mesh_inference.api.status import StatusInputs, build_status
from mesh_inference.core.dcf import Frame, MessageType
from mesh_inference.core.jointoken import JoinToken
from mesh_inference.core.membership import (
    Membership,
    MembershipEvent,
    MembershipTimers,
    PeerDied,
    PeerDiscovered,
    PeerLeft,
    first_incarnation,
)
from mesh_inference.core.meshmodel import PlanResult, choose_model, host_of, plan_for
from mesh_inference.core.messages import (
    NodeInfo,
    OpenTunnel,
    TaskHead,
    decode_payload,
    encode_payload,
)
from mesh_inference.core.plan import Plan, WaitingForCapacity
from mesh_inference.core.quarantine import Quarantine, QuarantinePolicy
from mesh_inference.core.rpc import MANIFEST_HEADER, decode_manifest, manifest_length
from mesh_inference.engine.backends import EngineBackend, EngineUnavailable, find_backend
from mesh_inference.engine.host import SETTLE_S, HostController
from mesh_inference.engine.weights import PASS_THROUGH, host_transforms, worker_transforms
from mesh_inference.engine.worker import WorkerService
from mesh_inference.machine.resources import MemoryOffer, detect_memory
from mesh_inference.machine.state import (
    load_or_create_console_token,
    load_or_create_identity,
    load_or_create_mesh,
    next_boot,
    write_private_file,
)
from mesh_inference.models.local import LocalModel
from mesh_inference.models.refs import ModelError, read_gguf_metadata, resolve_model
from mesh_inference.models.transfer import (
    FetchTarget,
    FileServer,
    HeldFile,
    ModelFetcher,
    Unfetchable,
    fetch_target,
)
from mesh_inference.net.addresses import local_addresses
from mesh_inference.net.dialer import Dialer
from mesh_inference.net.discovery import Discovery
from mesh_inference.net.endpoint import MeshEndpoint, PeerConnection
from mesh_inference.net.gossip import MembershipDriver
from mesh_inference.net.proxy import ProxiedResponse, serve_task
from mesh_inference.net.tunnel import TransformFactory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    state_dir: Path
    model_ref: str | None = None
    join: JoinToken | None = None
    client: bool = False
    name: str = field(default_factory=socket.gethostname)
    http_host: str = "127.0.0.1"
    http_port: int = 9337
    quic_host: str = "0.0.0.0"
    quic_port: int = 9337
    advertise_host: str | None = None
    max_vram_gb: float | None = None
    mdns: bool = True
    backend: str = "auto"
    llama_bin: Path | None = None
    models_dir: Path = Path("local-models")
    ctx_size: int = 4096
    threads: int | None = None
    max_datagram_size: int = 1452
    timers: MembershipTimers = field(default_factory=MembershipTimers)
    console_dir: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # --allow-host: more names the HTTP API answers to
    # --no-model-copy: never copy the mesh model's file from a peer (weights cross over RPC).
    no_model_copy: bool = False
    # --api-key: Bearer key for this node's /v1/* (None: open, allowed on loopback only
    # unless insecure_public); --model-alias: more names for the served model.
    api_key: str | None = None
    insecure_public: bool = False
    model_aliases: tuple[str, ...] = ()
    # --request-wait: how long an API request rides out a mesh that does not serve
    # (no host, engine relaunching, a dead upstream mid-stream) before it fails.
    request_wait: float = 30.0
    # Graceful leave: how long stop() lets API requests in flight finish (new ones get 503).
    drain_timeout: float = 10.0
    # Workers that keep failing stay out of this node's plans while it hosts (core/quarantine.py).
    quarantine: QuarantinePolicy = field(default_factory=QuarantinePolicy)
    # While hosting: a plan that only adds workers relaunches the engine once the plan has
    # not changed for this long (engine/host.py), so nodes joining one by one cost one load.
    plan_settle: float = SETTLE_S


class DiscoveryLike(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class NodeIO:
    """What the node takes from the machine; tests pass stand-ins."""

    backend: Callable[[NodeConfig], EngineBackend] = lambda c: find_backend(c.backend, c.llama_bin)
    memory: Callable[[NodeConfig], MemoryOffer] = lambda c: detect_memory(c.max_vram_gb, c.client)
    discovery: Callable[..., DiscoveryLike] = Discovery


class Node:
    def __init__(self, config: NodeConfig, io: NodeIO | None = None) -> None:
        self.config = config
        self.io = io or NodeIO()
        self.node_id = ""
        self.http_port = 0
        self.quic_port = 0
        self.join_token: JoinToken | None = None
        self.events = EventBus(self.status)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._members: MembershipDriver | None = None
        self._endpoint: MeshEndpoint | None = None
        # worker -> the tensor digests its file has (its manifest, read at tunnel open)
        self._manifests: dict[str, frozenset[bytes]] = {}
        self._dialer: Dialer | None = None
        self._discovery: DiscoveryLike | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._backend: EngineBackend | None = None
        self._backend_error: str | None = None
        self._worker: WorkerService | None = None
        self._host: HostController | None = None
        self._model = LocalModel(
            config.models_dir, config.state_dir / "model-index", self._local_changed
        )
        self._fetcher: ModelFetcher | None = None
        self._files = FileServer(self._held_file)
        self._memory = MemoryOffer(0, "none", "")
        self._plan: PlanResult | None = None
        self._planned: tuple[PlanResult | None, str | None, Path | None] | None = None
        self._plan_changes = 0  # for /metrics
        self._ticker: asyncio.Task[None] | None = None
        self._drain = Drain()
        self._quarantine = Quarantine(config.quarantine)
        self._quarantine_timer: asyncio.TimerHandle | None = None
        self._stop_started = False
        self._stopping = False
        self._closed = asyncio.Event()

    # ------------------------------------------------------------------ wiring
    async def start(self) -> None:
        cfg = self.config
        problem = public_bind_problem(cfg.http_host, cfg.api_key, cfg.insecure_public)
        if problem is not None:
            raise ValueError(problem)
        self._loop = asyncio.get_running_loop()
        identity = load_or_create_identity(cfg.state_dir)
        self.node_id = identity.node_id
        mesh = load_or_create_mesh(cfg.state_dir, cfg.join)
        self._memory = self.io.memory(cfg)
        if cfg.model_ref is not None:
            resolved = resolve_model(cfg.model_ref, cfg.models_dir)
            if resolved.path is None:
                raise ModelError(
                    f"model {cfg.model_ref!r} is not on this machine; download it first with "
                    f"`mesh-inference models download {cfg.model_ref}`"
                )
            # Fail fast on a corrupt file for the model the user asked for.
            meta = await asyncio.to_thread(read_gguf_metadata, resolved.path)
            self._model.adopt(0, cfg.model_ref, resolved, meta)
        if not cfg.client:
            try:
                self._backend = self.io.backend(cfg)
            except EngineUnavailable as exc:
                self._backend_error = str(exc)
                log.error("no inference engine: %s", exc)

        self._endpoint = MeshEndpoint(
            identity,
            mesh,
            host=cfg.quic_host,
            port=cfg.quic_port,
            max_datagram_size=cfg.max_datagram_size,
            on_peer_connected=self._on_peer_connected,
            on_peer_lost=self._on_peer_lost,
            on_control_frame=self._on_control_frame,
            on_stream=self._on_stream,
        )
        self.quic_port = await self._endpoint.start()
        advertise = [cfg.advertise_host] if cfg.advertise_host else self._advertise_hosts()
        self.join_token = JoinToken(
            mesh.mesh_id, mesh.secret, tuple(f"{h}:{self.quic_port}" for h in advertise)
        )
        write_private_file(cfg.state_dir / "join-token", (self.join_token.encode() + "\n").encode())
        # Each start counts a boot: this life's incarnation supersedes the earlier ones.
        membership = Membership(self._local_info(), self._loop.time(), cfg.timers,
                                incarnation=first_incarnation(next_boot(cfg.state_dir)))
        self._members = MembershipDriver(
            membership,
            send=self._endpoint.send_control,
            disconnect=self._endpoint.disconnect,
            on_events=self._on_membership_events,
        )
        self._dialer = Dialer(
            dial=self._endpoint.dial,
            connected=self._endpoint.peers,
            status_of=membership.status_of,
            own_addrs=lambda: {f"{h}:{self.quic_port}" for h in self._advertise_hosts()},
        )

        self._session = aiohttp.ClientSession()
        extra_hosts = [*cfg.allowed_hosts, *([cfg.advertise_host] if cfg.advertise_host else [])]
        app = create_app(
            self,
            console_dir=cfg.console_dir,
            console_token=load_or_create_console_token(cfg.state_dir),
            allowed_hosts=own_host_names(cfg.http_host, extra_hosts),
            api_key=cfg.api_key,
            model_aliases=cfg.model_aliases,
            request_wait=cfg.request_wait,
            drain=self._drain,
        )
        add_model_routes(app, self)
        # stop() drains the API requests itself; what is left then (event streams) ends quickly.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.http_host, cfg.http_port)
        await site.start()
        self.http_port = _bound_port(self._runner)
        self._local_changed()  # peers learn our HTTP port

        threads = cfg.threads or max(1, os.cpu_count() or 2)
        if self._backend is not None:
            self._worker = WorkerService(
                self._backend, state_dir=cfg.state_dir, threads=threads,
                on_change=self._local_changed,
                transforms=lambda: worker_transforms(self._model.weights),
                manifest=lambda: (
                    self._model.weights.manifest() if self._model.weights is not None else None
                ),
            )  # fmt: skip
            self._host = HostController(
                self._backend,
                state_dir=cfg.state_dir,
                open_tunnel=self._open_tunnel,
                local_rpc_port=lambda: self._worker.port if self._worker else 0,
                ctx_size=cfg.ctx_size,
                threads=threads,
                on_state=lambda _s, _d: self._local_changed(),
                transforms_for=self._host_transforms,
                on_worker_failure=self._peer_failed,
                settle=cfg.plan_settle,
            )
            await self._worker.start()
            if not cfg.client and not cfg.no_model_copy:
                self._fetcher = ModelFetcher(
                    self._open_fetch, on_change=self._fetch_changed, on_done=self._fetched
                )

        self._members.start()
        self._ticker = asyncio.ensure_future(self._status_ticker())
        if cfg.join is not None:
            self._dialer.bootstrap(cfg.join.addrs)
        if cfg.mdns:
            await self._start_discovery(mesh.mesh_id, advertise)
        node_file = {"node_id": self.node_id, "pid": os.getpid(), "http_url": self.http_url,
                     "quic_port": self.quic_port}  # fmt: skip
        (cfg.state_dir / "node.json").write_text(json.dumps(node_file) + "\n")
        self._replan()

    async def _start_discovery(self, mesh_id: str, advertise: list[str]) -> None:
        assert self._dialer is not None
        try:
            self._discovery = self.io.discovery(
                node_id=self.node_id,
                mesh_id=mesh_id,
                quic_port=self.quic_port,
                addresses=[a for a in advertise if a != "127.0.0.1"] or ["127.0.0.1"],
                on_found=self._dialer.mdns_found,
            )
            await self._discovery.start()
        except Exception as exc:  # mDNS is a convenience: never fatal
            log.warning("mDNS discovery unavailable: %s", exc)
            self._discovery = None

    def _advertise_hosts(self) -> list[str]:
        host = self.config.quic_host
        return [*local_addresses(), "127.0.0.1"] if host in ("0.0.0.0", "") else [host]

    async def stop(self) -> None:
        """Leave gracefully: drain the API, say Goodbye, stop the engine children, close.

        New API requests get a 503 from the moment this is called; those in flight
        get up to ``drain_timeout`` seconds (or until :meth:`skip_drain`) while the
        node still serves the mesh as before; then the peers hear Goodbye (they drop
        this node at once, no dead timeout) and the engines are stopped.
        """
        if self._stop_started:
            await self._closed.wait()
            return
        self._stop_started = True
        try:
            await self._leave()
        finally:
            self._closed.set()

    def skip_drain(self) -> None:
        """Stop waiting for API requests in flight (a second Ctrl-C)."""
        self._drain.skip()

    async def _leave(self) -> None:
        self._drain.close()
        if self._drain.active:
            log.info("draining %d API request(s), at most %.0f s", self._drain.active,
                     self.config.drain_timeout)  # fmt: skip
            if not await self._drain.wait_idle(self.config.drain_timeout):
                log.warning("stopping with %d API request(s) still running", self._drain.active)
        self._stopping = True
        if self._quarantine_timer is not None:
            self._quarantine_timer.cancel()
        if self._members is not None:
            await self._members.leave()
            await self._members.stop()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._dialer is not None:
            await self._dialer.close()
        if self._fetcher is not None:
            await self._fetcher.close()
        if self._host is not None:
            await self._host.stop()
        if self._worker is not None:
            await self._worker.stop()
        await self._model.close()
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.close()
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def http_url(self) -> str:
        host = self.config.http_host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.http_port}"

    # ------------------------------------------------------------------ local info
    def _local_info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_id,
            name=self.config.name[:64],
            role="client" if self.config.client else "member",
            memory_bytes=self._memory.bytes if self._backend is not None else 0,
            addrs=self.join_token.addrs if self.join_token else (),
            http_port=self.http_port,
            model=self._model.ref,
            has_model=self._model.resolved is not None,
            version=__version__,
            model_bytes=self._model.size_bytes,
            model_epoch=self._model.epoch,
            rpc_ready=self._worker is not None and self._worker.ready,
            engine_state=self._host.state if self._host else "stopped",
            model_sha256=self._model.sha256,
        )

    def _local_changed(self) -> None:
        """Something this node announces may have changed: gossip it, re-plan, tell listeners."""
        if self._members is not None and not self._stopping:
            self._members.local_changed(self._local_info())

    # ------------------------------------------------------------------ membership
    def _on_peer_connected(self, conn: PeerConnection) -> None:
        log.info("peer %s connected from %s", conn.peer_id, conn.remote_address)
        if self._members is not None:
            self._members.peer_connected(conn.peer_id)

    def _on_peer_lost(self, peer_id: str, reason: str) -> None:
        log.info("peer %s lost: %s", peer_id, reason)
        if reason.startswith("protocol error"):  # a bad frame, here or in the gossip driver
            self._peer_failed(peer_id, f"its connection broke the protocol: {reason}")
        if self._members is not None:
            self._members.peer_lost(peer_id, reason)

    def _on_control_frame(self, peer_id: str, frame: Frame) -> None:
        if self._members is not None:
            self._members.control_frame(peer_id, frame)

    def _on_membership_events(self, events: list[MembershipEvent]) -> None:
        assert self._dialer is not None and self._endpoint is not None
        for event in events:
            if isinstance(event, PeerDiscovered):
                # The smaller id dials; the other waits a little, so both rarely dial at once.
                delay = 0.0 if self.node_id < event.info.node_id else 3.0
                self._dialer.peer_discovered(event.info.node_id, event.info.addrs, delay=delay)
            elif isinstance(event, PeerDied | PeerLeft):
                dead = isinstance(event, PeerDied)
                self._endpoint.disconnect(event.node_id, "declared dead" if dead else "left")
                if self._host is not None:
                    self._host.drop_worker(event.node_id)
                if dead:
                    self._dialer.peer_died(event.node_id, self._addrs_of(event.node_id))
        self._replan()

    def _addrs_of(self, node_id: str) -> tuple[str, ...]:
        assert self._members is not None
        for rec in self._members.membership.records():
            if rec.info.node_id == node_id:
                return rec.info.addrs
        return ()

    # ------------------------------------------------------------------ quarantine
    def _peer_failed(self, peer_id: str, reason: str) -> None:
        """Something went wrong with a peer (engine/host.py, the endpoint): count it."""
        if self._loop is None or self._stopping or peer_id == self.node_id:
            return
        if self._record_failure(peer_id, reason, self._loop.time()):
            self._replan()

    def _record_failure(self, peer_id: str, reason: str, now: float) -> bool:
        if not self._quarantine.record_failure(peer_id, reason, now):
            return False
        entry = self._quarantine.entry(peer_id, now)
        log.warning("peer %s quarantined for %.0f s: %s", peer_id,
                    entry.until - now if entry else 0, reason)  # fmt: skip
        self._arm_quarantine()
        return True

    def _arm_quarantine(self) -> None:
        if self._quarantine_timer is not None:
            self._quarantine_timer.cancel()
            self._quarantine_timer = None
        when = self._quarantine.get_timer()
        if when is not None and self._loop is not None and not self._stopping:
            self._quarantine_timer = self._loop.call_at(when, self._quarantine_due)

    def _quarantine_due(self) -> None:
        assert self._loop is not None
        self._quarantine_timer = None
        released = self._quarantine.handle_timer(self._loop.time())
        for peer_id in released:
            log.info("peer %s leaves quarantine", peer_id)
        self._arm_quarantine()
        if released:
            self._replan()

    def _note_worker_failures(self, members: list[NodeInfo]) -> None:
        """Workers of the plan this node hosts that went down since it was made."""
        prev = self._plan
        if not isinstance(prev, Plan) or prev.host_id != self.node_id or self._loop is None:
            return
        assert self._members is not None
        by_id = {m.node_id: m for m in members}
        now = self._loop.time()
        for worker in prev.workers:
            info = by_id.get(worker)
            if info is None and self._members.membership.status_of(worker) == "dead":
                self._record_failure(worker, "it died while serving in the plan", now)
            elif info is not None and not info.rpc_ready:
                self._record_failure(worker, "its rpc-server went down while serving in the plan",
                                     now)  # fmt: skip

    def _quarantine_json(self, now: float) -> dict[str, dict[str, Any]]:
        """``peers[].quarantine`` of the status: why, and until when (Unix time)."""
        assert self._members is not None
        out: dict[str, dict[str, Any]] = {}
        wall = time.time()
        for rec in self._members.membership.records():
            entry = self._quarantine.entry(rec.info.node_id, now)
            if entry is not None:
                out[rec.info.node_id] = {"reason": entry.reason,
                                         "until": round(wall + entry.until - now, 3)}  # fmt: skip
        return out

    # ------------------------------------------------------------------ plan
    def _replan(self) -> None:
        if self._members is None or self._stopping:
            return
        members = self._members.membership.alive_members()
        choice = choose_model(members)
        here = (self._model.epoch, self._model.ref)
        if choice is not None and (choice.epoch, choice.ref) != here:
            self._model.adopt(choice.epoch, choice.ref)
            self._local_changed()  # announces the adoption, then re-plans
            return
        self._note_worker_failures(members)
        assert self._loop is not None
        # Only the host makes the split, so only its own quarantine counts (DESIGN.md).
        plan = plan_for(members, choice, planner=self.node_id,
                        left_out=self._quarantine.quarantined(self._loop.time()))  # fmt: skip
        if self._fetcher is not None:
            self._fetcher.want(self._model.ref, self._fetch_target(members, plan))
        planned = (plan, self._model.ref, self._model.path)
        if planned != self._planned:
            log.info("plan for %s: %s", self._model.ref, plan)
            self._plan, self._planned = plan, planned
            self._plan_changes += 1
            if self._worker is not None:
                self._worker.set_host(host_of(plan))
            self._apply(plan)
        self._publish_status()

    def _apply(self, plan: PlanResult | None) -> None:
        if self._host is None:
            return
        if isinstance(plan, Plan) and plan.host_id == self.node_id and self._model.path:
            self._host.apply(plan, self._model.path, self._model.served_name() or "model")
        elif isinstance(plan, WaitingForCapacity) and plan.host_id == self.node_id:
            self._host.apply(None, idle=("waiting", plan.reason))
        else:
            self._host.apply(None, idle=("stopped", "not the host"))

    async def settled(self) -> None:
        """Until scheduled engine applications and model reads have run (tests)."""
        await self._model.settled()
        if self._host is not None:
            await self._host.settled()

    def _host_transforms(self, worker: str) -> TransformFactory:
        """Weight references for the tensors a worker holds; the bytes of the others."""
        weights, mine = self._model.weights, self._model.sha256
        if weights is None or mine is None or self._members is None:
            return PASS_THROUGH
        theirs = next(
            (m.model_sha256 for m in self._members.membership.alive_members()
             if m.node_id == worker),
            None,
        )  # fmt: skip
        if theirs == mine:
            return host_transforms(weights)
        # Another file (or none): references for the tensors it has, per its manifest.
        held = self._manifests.get(worker)
        return host_transforms(weights, held) if held else PASS_THROUGH

    # ------------------------------------------------------------------ model copies
    def _fetch_target(
        self, members: list[NodeInfo], plan: PlanResult | None
    ) -> FetchTarget | Unfetchable | None:
        """What to copy from a peer: the mesh model, when it is not here (models/transfer.py)."""
        ref = self._model.ref
        if ref is None or self._model.resolved is not None:
            return None
        return fetch_target(ref, members, self.config.models_dir, self.node_id, host_of(plan))

    def _held_file(self, sha256: str) -> HeldFile | None:
        """Peers may copy the mesh model's file, and only that one, named by its digest."""
        weights = self._model.weights
        if weights is None or weights.index.sha256 != sha256:
            return None
        return HeldFile(weights.path, weights.index.size)

    async def _open_fetch(self, peer: str, payload: bytes) -> tuple[asyncio.StreamReader, Any]:
        assert self._endpoint is not None
        return await self._endpoint.open_stream(peer, MessageType.FETCH_MODEL, payload)

    def _fetch_changed(self) -> None:
        status = self._fetcher.status if self._fetcher is not None else None
        if status is not None and self.events.has_subscribers:
            self.publish("download", {
                "ref": status.ref, "name": status.ref, "from": status.source,
                "downloaded_bytes": status.bytes, "total_bytes": status.total or None,
                "done": status.state in ("done", "unsupported"), "error": status.error,
            })  # fmt: skip
        self._publish_status()

    def _fetched(self, target: FetchTarget) -> None:
        """The file is here now: find it, index it, announce it (then plans use references)."""
        if self._model.ref == target.ref and self._model.resolved is None:
            self._model.adopt(self._model.epoch, target.ref)
            self._local_changed()

    # ------------------------------------------------------------------ streams
    async def _open_tunnel(self, worker: str) -> tuple[asyncio.StreamReader, Any]:
        assert self._endpoint is not None
        ask = self._model.weights is not None  # references need our own file
        payload = encode_payload(OpenTunnel("rpc", manifest=ask))
        reader, writer = await self._endpoint.open_stream(
            worker, MessageType.OPEN_TUNNEL, payload
        )
        if ask:
            try:
                size = manifest_length(await reader.readexactly(MANIFEST_HEADER.size))
                self._manifests[worker] = decode_manifest(await reader.readexactly(size))
            except BaseException:
                writer.close()
                raise
        return reader, writer

    async def _on_stream(
        self, peer_id: str, first: Frame, reader: asyncio.StreamReader, writer: Any
    ) -> None:
        if first.type == MessageType.OPEN_TUNNEL and self._worker is not None:
            msg = decode_payload(first.type, first.payload)
            assert isinstance(msg, OpenTunnel)
            await self._worker.serve_tunnel(peer_id, msg, reader, writer)
        elif first.type == MessageType.TASK and self._session is not None:
            # A peer reaches the OpenAI routes only, served here directly.
            handler = (
                _refuse_task  # leaving: the peer retries elsewhere (api/continuity.py)
                if self._drain.closing
                else make_task_handler(self, self._session, self.config.model_aliases)
            )
            with self._drain.track():
                await serve_task(reader, writer, handler, first=first)
        elif first.type == MessageType.FETCH_MODEL:
            await self._files.serve(peer_id, first, writer)
        else:
            writer.close()

    # ------------------------------------------------------------------ gateway backend
    def host_id(self) -> str | None:
        return host_of(self._plan)

    def is_host(self) -> bool:
        return self.host_id() == self.node_id

    def engine_url(self) -> str | None:
        return self._host.url if self._host is not None and self.is_host() else None

    def served_model(self) -> str | None:
        return self._model.served_name()

    async def open_host_stream(self) -> tuple[asyncio.StreamReader, Any]:
        host = self.host_id()
        if host is None or self._endpoint is None:
            raise NoHostError("the mesh has no host yet")
        if host == self.node_id:
            raise NoHostError("this node is the host")
        try:
            return await self._endpoint.open_stream_raw(host)
        except KeyError:
            raise NoHostError(f"no connection to host {host}") from None

    def status(self) -> dict[str, Any]:
        assert self._members is not None and self._loop is not None
        model: dict[str, Any] = {
            "ref": self._model.ref,
            "name": self._model.served_name(),
            "size_bytes": self._model.size_bytes or None,
            "layers": self._model.layers,
            "sha256": self._model.sha256,
        }
        return build_status(
            StatusInputs(
                node_id=self.node_id,
                client=self.config.client,
                http_url=self.http_url,
                mesh_id=self.join_token.mesh_id if self.join_token else None,
                join_token=self.join_token.encode() if self.join_token else None,
                membership=self._members.membership,
                now=self._loop.time(),
                plan=self._plan,
                rtt=self._endpoint.rtt if self._endpoint else lambda _p: None,
                rpc_state=self._worker.state if self._worker else "none",
                engine_state=self._host.state if self._host else "stopped",
                engine_detail=self._host.detail if self._host else "",
                engine_startup_s=self._host.startup_s if self._host else None,
                backend=self._backend.name if self._backend else None,
                backend_error=self._backend_error,
                model=model,
                tunnels=self._host.tunnel_stats() if self._host else {},
                model_fetch=self._fetcher.status.as_json()
                if self._fetcher is not None and self._fetcher.status is not None
                else None,
                quarantine=self._quarantine_json(self._loop.time()),
            )
        )

    def metric_counters(self) -> NodeCounters:
        """Event counts for ``/metrics`` (the rest is read from :meth:`status`)."""
        host = self._host
        return NodeCounters(
            plan_changes=self._plan_changes,
            engine_restarts=dict(host.restarts) if host is not None else {},
            engine_crashes=host.crashes if host is not None else 0,
        )

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self.events.subscribe()

    def publish(self, event: str, data: dict[str, Any]) -> None:
        self.events.publish(event, data)

    def _publish_status(self) -> None:
        if self.events.has_subscribers and self._members is not None:
            self.events.publish("status", self.status())

    async def _status_ticker(self) -> None:
        while True:  # RTT and last-seen change continuously
            await asyncio.sleep(2.0)
            self._publish_status()

    # ------------------------------------------------------------------ models backend
    def models_dir(self) -> Path:
        return self.config.models_dir

    def current_model(self) -> str | None:
        return self._model.ref

    async def switch_model(self, ref: str) -> None:
        """Make the whole mesh serve ``ref``: a higher epoch wins everywhere."""
        assert self._members is not None
        try:
            resolved = resolve_model(ref, self.config.models_dir)
            if resolved.path is None:
                raise ValueError(f"model {ref!r} is not downloaded on this node yet")
            meta = await asyncio.to_thread(read_gguf_metadata, resolved.path)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        epoch = 1 + max(m.model_epoch for m in self._members.membership.alive_members())
        self._model.adopt(epoch, ref, resolved, meta)
        self._local_changed()
        self.publish("model", {"ref": ref, "epoch": epoch})


async def _refuse_task(_head: TaskHead, _body: bytes) -> ProxiedResponse:
    return shutting_down()


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        return int(addr[1])
    raise OSError("the HTTP server bound no socket")
