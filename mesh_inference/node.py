"""The node: owns one of each part and wires their events together.

State lives in the parts (membership core, QUIC endpoint, supervisors,
tunnels); the node only derives the plan from membership and acts on
changes. Everything runs on one asyncio loop; the sans-I/O cores are fed
``loop.time()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mesh_inference import __version__
from mesh_inference.api.console import add_model_routes
from mesh_inference.api.gateway import NoHostError, create_app, make_local_handler
from mesh_inference.core.dcf import Frame, MessageType, ProtocolError
from mesh_inference.core.identity import NodeIdentity
from mesh_inference.core.jointoken import JoinToken
from mesh_inference.core.membership import (
    Membership,
    MembershipEvent,
    MembershipTimers,
    PeerDied,
    PeerDiscovered,
    PeerLeft,
)
from mesh_inference.core.messages import (
    Goodbye,
    Gossip,
    Heartbeat,
    NodeInfo,
    OpenTunnel,
    decode_payload,
    encode_payload,
)
from mesh_inference.core.plan import Candidate, NoEligibleHost, Plan, WaitingForCapacity, elect
from mesh_inference.engine.backends import EngineBackend, EngineUnavailable, find_backend
from mesh_inference.engine.supervisor import (
    EngineExited,
    EngineReady,
    ProcessSupervisor,
    SupervisorEvent,
)
from mesh_inference.machine.resources import MemoryOffer, detect_memory
from mesh_inference.machine.state import load_or_create_identity, load_or_create_mesh
from mesh_inference.models.refs import ModelError, ResolvedModel, read_gguf_metadata, resolve_model
from mesh_inference.net.discovery import Discovery
from mesh_inference.net.endpoint import MeshEndpoint, PeerConnection
from mesh_inference.net.proxy import serve_task
from mesh_inference.net.tunnel import TunnelListener, bridge_to_local

log = logging.getLogger(__name__)

PlanResult = Plan | WaitingForCapacity | NoEligibleHost


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


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def local_addresses() -> list[str]:
    """IPv4 addresses a peer might reach us on, most useful first."""
    import psutil

    addrs: list[str] = []
    for _name, snics in psutil.net_if_addrs().items():
        for snic in snics:
            if snic.family == socket.AF_INET and not snic.address.startswith("127."):
                addrs.append(snic.address)
    return addrs or ["127.0.0.1"]


def role_in(plan: PlanResult | None, node_id: str, client: bool) -> str:
    if client:
        return "client"
    if isinstance(plan, Plan):
        if plan.host_id == node_id:
            return "host"
        if node_id in plan.workers:
            return "worker"
    elif isinstance(plan, WaitingForCapacity) and plan.host_id == node_id:
        return "host"
    return "standby"


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.identity: NodeIdentity | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._membership: Membership | None = None
        self._endpoint: MeshEndpoint | None = None
        self._discovery: Discovery | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._backend: EngineBackend | None = None
        self._backend_error: str | None = None
        self._rpc: ProcessSupervisor | None = None
        self._engine: ProcessSupervisor | None = None
        self._tunnels: dict[str, TunnelListener] = {}
        self._plan: PlanResult | None = None
        self._engine_state = "stopped"
        self._engine_detail = ""
        self._model: ResolvedModel | None = None
        self._model_layers: int | None = None
        self._mesh_model: str | None = None
        self._model_epoch = 0
        self._planned_model: str | None = None
        self._memory: MemoryOffer | None = None
        self._rpc_port = 0
        self._engine_port = 0
        self.http_port = 0
        self.quic_port = 0
        self.join_token: JoinToken | None = None
        self._wakeup = asyncio.Event()
        self._apply_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dialing: set[str] = set()
        self._subscribers: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()
        self._stopping = False
        self._closed = asyncio.Event()

    # ------------------------------------------------------------------ start/stop
    async def start(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity = load_or_create_identity(cfg.state_dir)
        mesh = load_or_create_mesh(cfg.state_dir, cfg.join)
        self._memory = detect_memory(cfg.max_vram_gb, cfg.client)
        if cfg.model_ref is not None:
            resolved = resolve_model(cfg.model_ref, cfg.models_dir)
            if resolved.path is None:
                raise ModelError(
                    f"model {cfg.model_ref!r} is not on this machine; download it first with "
                    f"`mesh-inference models download {cfg.model_ref}`"
                )
            # Fail fast on a corrupt file for the model the user asked for.
            await asyncio.to_thread(read_gguf_metadata, resolved.path)
            self._adopt_model(0, cfg.model_ref, resolved)
        if not cfg.client:
            try:
                self._backend = find_backend(cfg.backend, cfg.llama_bin)
            except EngineUnavailable as exc:
                self._backend_error = str(exc)
                log.error("no inference engine: %s", exc)

        self._endpoint = MeshEndpoint(
            self.identity,
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
        token_path = cfg.state_dir / "join-token"
        token_path.write_text(self.join_token.encode() + "\n")
        token_path.chmod(0o600)

        now = self._loop.time()
        self._membership = Membership(self._local_info(), now, cfg.timers)

        self._session = aiohttp.ClientSession()
        app = create_app(self, console_dir=cfg.console_dir)
        add_model_routes(app, self)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.http_host, cfg.http_port)
        await site.start()
        server = site._server
        assert server is not None
        self.http_port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        self._refresh_local()  # peers learn our HTTP port

        if not cfg.client and self._backend is not None:
            await self._start_rpc_server()

        self._spawn(self._timer_loop(), "membership timers")
        self._spawn(self._status_ticker(), "status ticker")
        if cfg.join is not None:
            for addr in cfg.join.addrs:
                self._spawn(self._dial_loop(addr, bootstrap=True), f"dial {addr}")
        if cfg.mdns:
            try:
                self._discovery = Discovery(
                    node_id=self.node_id,
                    mesh_id=mesh.mesh_id,
                    quic_port=self.quic_port,
                    addresses=[a for a in advertise if a != "127.0.0.1"] or ["127.0.0.1"],
                    on_found=self._on_mdns_found,
                )
                await self._discovery.start()
            except Exception as exc:  # mDNS is a convenience: never fatal
                log.warning("mDNS discovery unavailable: %s", exc)
                self._discovery = None
        self._write_node_file()
        self._replan()

    def _advertise_hosts(self) -> list[str]:
        host = self.config.quic_host
        if host in ("0.0.0.0", ""):
            return [*local_addresses(), "127.0.0.1"]
        return [host]

    def _write_node_file(self) -> None:
        info = {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "http_url": self.http_url,
            "quic_port": self.quic_port,
        }
        (self.config.state_dir / "node.json").write_text(json.dumps(info) + "\n")

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._membership is not None and self._endpoint is not None and self._loop:
            self._membership.leave(self._loop.time())
            self._flush_outgoing()
            await asyncio.sleep(0.05)  # let the Goodbyes leave before the connections close
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._engine is not None:
            await self._engine.stop()
        if self._rpc is not None:
            await self._rpc.stop()
        for tunnel in self._tunnels.values():
            await tunnel.close()
        self._tunnels.clear()
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.close()
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _spawn(self, coro: Awaitable[Any], what: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ identity
    @property
    def node_id(self) -> str:
        assert self.identity is not None
        return self.identity.node_id

    @property
    def http_url(self) -> str:
        host = self.config.http_host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.http_port}"

    def _adopt_model(self, epoch: int, ref: str, resolved: ResolvedModel | None = None) -> None:
        """Make ``ref`` this node's idea of the mesh model; find its file here if we have it.

        Only cheap checks run here (on the event loop); the GGUF metadata is
        read in a thread, because parsing a large header can take seconds and
        a blocked loop misses heartbeats.
        """
        self._model_epoch, self._mesh_model = epoch, ref
        self._model, self._model_layers = None, None
        try:
            resolved = resolved or resolve_model(ref, self.config.models_dir)
        except ModelError as exc:
            log.info("mesh model %s is not usable here: %s", ref, exc)
            return
        if resolved.path is not None:
            self._model = resolved
            self._spawn(self._read_layers(resolved), "read model metadata")

    async def _read_layers(self, resolved: ResolvedModel) -> None:
        assert resolved.path is not None
        try:
            meta = await asyncio.to_thread(read_gguf_metadata, resolved.path)
        except ModelError as exc:
            log.warning("model %s is unusable: %s", resolved.ref, exc)
            if self._model is resolved:
                self._model = None
                self._refresh_local()
                self._replan()
            return
        if self._model is resolved:
            self._model_layers = meta.layers
            self._publish_status()

    def _local_info(self) -> NodeInfo:
        assert self._memory is not None
        return NodeInfo(
            node_id=self.node_id,
            name=self.config.name[:64],
            role="client" if self.config.client else "member",
            memory_bytes=self._memory.bytes if self._backend is not None else 0,
            addrs=self.join_token.addrs if self.join_token else (),
            http_port=self.http_port,
            model=self._mesh_model,
            has_model=self._model is not None,
            version=__version__,
            model_bytes=(self._model.size_bytes or 0) if self._model else 0,
            model_epoch=self._model_epoch,
            rpc_ready=self._rpc is not None and self._rpc.state == "ready",
            engine_state=self._engine_state,
        )

    def _refresh_local(self) -> None:
        if self._membership is None or self._loop is None:
            return
        info = self._local_info()
        if info != self._membership.local:
            self._membership.update_local(info, self._loop.time())
            self._wakeup.set()

    # ------------------------------------------------------------------ rpc-server
    async def _start_rpc_server(self) -> None:
        assert self._backend is not None
        self._rpc_port = free_tcp_port()
        cache_dir = self.config.state_dir / "rpc-cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._rpc = ProcessSupervisor(
            "rpc-server",
            log_path=self.config.state_dir / "rpc-server.log",
            health_url=None,
            health_tcp=("127.0.0.1", self._rpc_port),
            on_event=self._on_supervisor_event,
        )
        argv = self._backend.rpc_server_command(
            port=self._rpc_port, threads=self._threads(), cache_dir=cache_dir
        )
        await self._rpc.start(argv, self._backend.env(cache_dir))

    def _threads(self) -> int:
        if self.config.threads:
            return self.config.threads
        return max(1, (os.cpu_count() or 2))

    # ------------------------------------------------------------------ QUIC callbacks
    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_peer_connected(self, conn: PeerConnection) -> None:
        log.info("peer %s connected from %s", conn.peer_id, conn.remote_address)
        assert self._membership is not None
        self._membership.handle_connected(conn.peer_id, self._now())
        self._pump_membership()

    def _on_peer_lost(self, peer_id: str, reason: str) -> None:
        log.info("peer %s lost: %s", peer_id, reason)
        if self._membership is None or self._stopping:
            return
        self._membership.handle_disconnected(peer_id, self._now(), reason)
        self._pump_membership()

    def _on_control_frame(self, peer_id: str, frame: Frame) -> None:
        assert self._membership is not None and self._endpoint is not None
        now = self._now()
        try:
            msg = decode_payload(frame.type, frame.payload)
        except ProtocolError as exc:
            log.warning("dropping peer %s: %s", peer_id, exc)
            self._endpoint.disconnect(peer_id, f"protocol error: {exc}")
            return
        if isinstance(msg, Heartbeat):
            self._membership.handle_heartbeat(peer_id, msg, now)
        elif isinstance(msg, Gossip):
            self._membership.handle_gossip(peer_id, msg, now)
        elif isinstance(msg, Goodbye):
            self._membership.handle_goodbye(peer_id, now)
        else:
            log.warning("dropping peer %s: unexpected %s on control stream", peer_id, frame.type)
            self._endpoint.disconnect(peer_id, f"unexpected {frame.type.name}")
            return
        self._pump_membership()

    async def _on_stream(
        self, peer_id: str, first: Frame, reader: asyncio.StreamReader, writer: Any
    ) -> None:
        if first.type == MessageType.OPEN_TUNNEL:
            msg = decode_payload(first.type, first.payload)
            assert isinstance(msg, OpenTunnel)
            if msg.service != "rpc" or self._rpc is None or self._rpc.state != "ready":
                writer.close()
                return
            await bridge_to_local(reader, writer, "127.0.0.1", self._rpc_port)
        elif first.type == MessageType.TASK:
            assert self._session is not None
            handler = make_local_handler(self.http_url, self._session)
            await serve_task(reader, writer, handler, first=first)
        else:
            writer.close()

    # ------------------------------------------------------------------ membership
    def _pump_membership(self) -> None:
        assert self._membership is not None
        changed = False
        while (event := self._membership.next_event()) is not None:
            changed = True
            self._on_membership_event(event)
        self._flush_outgoing()
        if changed:
            self._replan()
        self._wakeup.set()

    def _flush_outgoing(self) -> None:
        assert self._membership is not None and self._endpoint is not None
        for out in self._membership.pop_outgoing():
            payload = encode_payload(out.message)
            mtype = {
                Heartbeat: MessageType.HEARTBEAT,
                Gossip: MessageType.GOSSIP,
                Goodbye: MessageType.GOODBYE,
            }[type(out.message)]
            # KeyError: the connection went away between the timer and the send.
            with contextlib.suppress(KeyError):
                self._endpoint.send_control(out.peer_id, mtype, payload)

    def _on_membership_event(self, event: MembershipEvent) -> None:
        log.info("membership: %s", event)
        if isinstance(event, PeerDiscovered):
            if event.info.node_id != self.node_id:
                # The smaller id dials; the other waits a little, so both rarely dial at once.
                delay = 0.0 if self.node_id < event.info.node_id else 3.0
                for addr in event.info.addrs:
                    self._spawn(
                        self._dial_loop(
                            addr, bootstrap=False, peer_id=event.info.node_id, delay=delay
                        ),
                        f"dial {addr}",
                    )
        elif isinstance(event, PeerDied | PeerLeft):
            pid = event.node_id
            if self._endpoint is not None:
                self._endpoint.disconnect(
                    pid, "declared dead" if isinstance(event, PeerDied) else "left"
                )
            if isinstance(event, PeerDied) and self._membership is not None:
                # It may only have been slow: keep knocking for a while.
                rec = next((r for r in self._membership.records() if r.info.node_id == pid), None)
                for addr in rec.info.addrs if rec else ():
                    self._spawn(
                        self._dial_loop(
                            addr, bootstrap=False, peer_id=pid, delay=0.5, give_up_after=600.0
                        ),
                        f"redial {addr}",
                    )
            tunnel = self._tunnels.pop(pid, None)
            if tunnel is not None:
                self._spawn(tunnel.close(), f"close tunnel {pid}")
        self._publish_status()

    async def _timer_loop(self) -> None:
        assert self._membership is not None and self._loop is not None
        while True:
            deadline = self._membership.get_timer()
            now = self._loop.time()
            timeout = 0.5 if deadline is None else max(0.0, deadline - now)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            now = self._loop.time()
            deadline = self._membership.get_timer()
            if deadline is not None and deadline <= now:
                self._membership.handle_timer(now)
                self._pump_membership()

    async def _dial_loop(
        self,
        addr: str,
        *,
        bootstrap: bool,
        peer_id: str | None = None,
        delay: float = 0.0,
        give_up_after: float = 60.0,
    ) -> None:
        """Dial ``addr`` until connected, with back-off.

        A bootstrap (join token) address is dialed again whenever this node
        finds itself alone; a known peer is dialed until it answers, leaves,
        or ``give_up_after`` seconds pass.
        """
        assert self._endpoint is not None and self._loop is not None
        key = f"{addr}/{peer_id}"
        if key in self._dialing:
            return
        self._dialing.add(key)
        deadline = self._loop.time() + give_up_after
        try:
            if delay:
                await asyncio.sleep(delay)
            delay = 0.2
            own = {f"{h}:{self.quic_port}" for h in self._advertise_hosts()}
            while not self._stopping and addr not in own:
                if peer_id is not None:
                    if peer_id in self._endpoint.peers():
                        return
                    if (
                        self._membership is not None
                        and self._membership.status_of(peer_id) == "left"
                    ):
                        return
                    if self._loop.time() > deadline:
                        return
                elif self._endpoint.peers():
                    # A bootstrap address is only needed while we are alone (another of
                    # the token's addresses may have worked).
                    await asyncio.sleep(1.0)
                    delay = 0.2
                    continue
                try:
                    got = await self._endpoint.dial(addr)
                except Exception as exc:
                    log.debug("dial %s failed: %s", addr, exc)
                else:
                    log.info("dialed %s: node %s", addr, got)
                    if not bootstrap:
                        return
                    while not self._stopping and self._endpoint.peers():  # noqa: ASYNC110
                        await asyncio.sleep(1.0)
                    delay = 0.2
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._dialing.discard(key)

    def _on_mdns_found(self, peer_id: str, addrs: list[str]) -> None:
        if self._endpoint is None or peer_id in self._endpoint.peers():
            return
        for addr in addrs:
            self._spawn(self._dial_loop(addr, bootstrap=False, peer_id=peer_id), f"dial {addr}")

    # ------------------------------------------------------------------ plan + engine
    def _replan(self) -> None:
        if self._membership is None or self._stopping:
            return
        members = self._membership.alive_members()
        best = max(((m.model_epoch, m.model) for m in members if m.model), default=None)
        if best is not None and best != (self._model_epoch, self._mesh_model):
            self._adopt_model(best[0], best[1])
            self._refresh_local()
            members = self._membership.alive_members()
        mesh_model = self._mesh_model
        model_bytes = max(
            (
                m.model_bytes
                for m in members
                if m.has_model and (m.model_epoch, m.model) == (self._model_epoch, mesh_model)
            ),
            default=0,
        )
        candidates = [
            Candidate(m.node_id, m.memory_bytes, m.role == "client", m.has_model)
            for m in members
            if m.role == "client" or m.rpc_ready
        ]
        plan: PlanResult | None
        plan = elect(candidates, model_bytes) if mesh_model is not None else None
        if plan != self._plan or mesh_model != self._planned_model:
            log.info("plan for %s: %s", mesh_model, plan)
            self._plan, self._planned_model = plan, mesh_model
            self._spawn(self._apply_plan(plan), "apply plan")
        self._publish_status()

    async def _apply_plan(self, plan: PlanResult | None) -> None:
        # One application at a time; a plan superseded while queued is skipped.
        async with self._apply_lock:
            if plan is self._plan:
                await self._apply_current(plan)

    async def _apply_current(self, plan: PlanResult | None) -> None:
        is_host = isinstance(plan, Plan) and plan.host_id == self.node_id
        if not is_host or self._backend is None or self._model is None or self._model.path is None:
            await self._stop_engine("not the host" if not is_host else "no engine")
            if isinstance(plan, WaitingForCapacity) and plan.host_id == self.node_id:
                self._set_engine_state("waiting", plan.reason)
            return
        assert isinstance(plan, Plan)
        endpoints: list[str] = []
        for worker in plan.workers:
            tunnel = self._tunnels.get(worker)
            if tunnel is None:
                tunnel = TunnelListener(self._tunnel_opener(worker))
                await tunnel.start("127.0.0.1", 0)
                self._tunnels[worker] = tunnel
            endpoints.append(f"127.0.0.1:{tunnel.port}")
        for stale in set(self._tunnels) - set(plan.workers):
            await self._tunnels.pop(stale).close()
        endpoints.append(f"127.0.0.1:{self._rpc_port}")
        if plan is not self._plan:
            return
        if not self._engine_port:
            self._engine_port = free_tcp_port()
        argv = self._backend.llama_server_command(
            model=self._model.path,
            rpc_endpoints=endpoints,
            tensor_split=list(plan.tensor_split),
            port=self._engine_port,
            ctx_size=self.config.ctx_size,
            threads=self._threads(),
            alias=self.served_model() or "model",
        )
        if self._engine is None:
            self._engine = ProcessSupervisor(
                "llama-server",
                log_path=self.config.state_dir / "llama-server.log",
                health_url=f"http://127.0.0.1:{self._engine_port}{self._backend.health_path}",
                on_event=self._on_supervisor_event,
            )
        self._set_engine_state("starting", f"{len(plan.workers) + 1} devices")
        await self._engine.start(argv, self._backend.env())

    def _tunnel_opener(
        self, worker: str
    ) -> Callable[[], Awaitable[tuple[asyncio.StreamReader, Any]]]:
        async def open_stream() -> tuple[asyncio.StreamReader, Any]:
            assert self._endpoint is not None
            return await self._endpoint.open_stream(
                worker, MessageType.OPEN_TUNNEL, encode_payload(OpenTunnel("rpc"))
            )

        return open_stream

    async def _stop_engine(self, why: str) -> None:
        if self._engine is not None and self._engine.state != "stopped":
            log.info("stopping engine: %s", why)
            await self._engine.stop()
        self._set_engine_state("stopped", why)

    def _set_engine_state(self, state: str, detail: str = "") -> None:
        if (state, detail) != (self._engine_state, self._engine_detail):
            self._engine_state, self._engine_detail = state, detail
            self._refresh_local()
            self._publish_status()

    def _on_supervisor_event(self, event: SupervisorEvent) -> None:
        log.info("supervisor: %s", event)
        if event.name == "rpc-server":
            self._refresh_local()
            self._replan()
            return
        if isinstance(event, EngineReady):
            self._set_engine_state("ready", f"ready in {event.startup_s:.1f} s")
        elif isinstance(event, EngineExited):
            if not event.expected:
                self._set_engine_state("crashed", f"exit code {event.returncode}")
        elif self._engine is not None:
            self._set_engine_state(self._engine.state, self._engine_detail)

    # ------------------------------------------------------------------ gateway backend
    def is_host(self) -> bool:
        return self.host_id() == self.node_id

    def engine_url(self) -> str | None:
        if self.is_host() and self._engine_state == "ready":
            return f"http://127.0.0.1:{self._engine_port}"
        return None

    def served_model(self) -> str | None:
        ref = self._mesh_model
        if ref is None:
            return None
        return Path(ref).name.removesuffix(".gguf") if ref.endswith(".gguf") else ref

    def host_id(self) -> str | None:
        plan = self._plan
        if isinstance(plan, Plan | WaitingForCapacity):
            return plan.host_id
        return None

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
        assert self._membership is not None
        now = self._now()
        plan = self._plan
        shares: dict[str, float] = {}
        plan_json: dict[str, Any] = {
            "state": "none",
            "host_id": None,
            "order": [],
            "tensor_split": [],
            "reason": "no model announced",
        }
        if isinstance(plan, Plan):
            order = [*plan.workers, plan.host_id]
            shares = dict(zip(order, plan.tensor_split, strict=True))
            plan_json = {
                "state": "planned",
                "host_id": plan.host_id,
                "order": order,
                "tensor_split": list(plan.tensor_split),
                "reason": None,
            }
        elif isinstance(plan, WaitingForCapacity):
            plan_json = {
                "state": "waiting",
                "host_id": plan.host_id,
                "order": [],
                "tensor_split": [],
                "reason": plan.reason,
                "needed_bytes": plan.needed_bytes,
                "available_bytes": plan.available_bytes,
            }
        elif isinstance(plan, NoEligibleHost):
            plan_json["reason"] = plan.reason
        host = self.host_id()
        peers = []
        for rec in self._membership.records():
            info = rec.info
            if info.node_id == self.node_id:
                continue
            last = self._membership.last_heard(info.node_id)
            rtt = self._endpoint.rtt(info.node_id) if self._endpoint else None
            peers.append(
                {
                    "id": info.node_id,
                    "name": info.name,
                    "role": role_in(plan, info.node_id, info.role == "client"),
                    "status": rec.status,
                    "memory_bytes": info.memory_bytes,
                    "addrs": list(info.addrs),
                    "last_seen_s": None if last is None else round(now - last, 3),
                    "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
                    "share": shares.get(info.node_id),
                    "engine_state": info.engine_state,
                }
            )
        host_engine = self._engine_state
        if host is not None and host != self.node_id:
            rec_host = next((r for r in self._membership.records() if r.info.node_id == host), None)
            host_engine = rec_host.info.engine_state if rec_host else "unknown"
        me = self._membership.local
        model: dict[str, Any] = {
            "ref": self._mesh_model,
            "name": self.served_model(),
            "size_bytes": None,
            "layers": self._model_layers,
        }
        if self._model is not None and self._model.ref == self._mesh_model:
            model["size_bytes"] = self._model.size_bytes
        return {
            "node": {
                "id": self.node_id,
                "name": me.name,
                "role": role_in(plan, self.node_id, self.config.client),
                "memory_bytes": me.memory_bytes,
                "addrs": list(me.addrs),
                "http_url": self.http_url,
                "share": shares.get(self.node_id),
                "rpc_state": self._rpc.state if self._rpc else "none",
            },
            "mesh_id": self.join_token.mesh_id if self.join_token else None,
            "host_id": host,
            "model": model,
            "peers": peers,
            "plan": plan_json,
            "engine": {
                "state": host_engine,
                "backend": self._backend.name if self._backend else None,
                "detail": self._engine_detail if host == self.node_id else "",
                "error": self._backend_error,
            },
            "ready": host_engine == "ready",
            "tunnels": {
                wid: {"port": t.port, "bytes_up": t.bytes_up, "bytes_down": t.bytes_down}
                for wid, t in self._tunnels.items()
            },
            "join_token": self.join_token.encode() if self.join_token else None,
            "version": __version__,
            "time": time.time(),
        }

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self._subscription()

    async def _subscription(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=64)
        self._subscribers.add(queue)
        try:
            yield "status", self.status()
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # a slow browser loses old events, not new ones
            queue.put_nowait((event, data))

    def _publish_status(self) -> None:
        if self._subscribers and self._membership is not None:
            self.publish("status", self.status())

    async def _status_ticker(self) -> None:
        # RTT and last-seen change continuously; refresh listeners now and then.
        while True:
            await asyncio.sleep(2.0)
            self._publish_status()

    # ------------------------------------------------------------------ models backend
    def models_dir(self) -> Path:
        return self.config.models_dir

    def current_model(self) -> str | None:
        return self._mesh_model

    async def switch_model(self, ref: str) -> None:
        """Make the whole mesh serve ``ref``: a higher epoch wins everywhere."""
        assert self._membership is not None
        try:
            resolved = resolve_model(ref, self.config.models_dir)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        if resolved.path is None:
            raise ValueError(f"model {ref!r} is not downloaded on this node yet")
        try:
            await asyncio.to_thread(read_gguf_metadata, resolved.path)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        epoch = 1 + max(m.model_epoch for m in self._membership.alive_members())
        self._adopt_model(epoch, ref, resolved)
        self._refresh_local()
        self._replan()
        self.publish("model", {"ref": ref, "epoch": epoch})
