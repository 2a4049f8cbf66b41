"""The worker service: this node's rpc-server, and the tunnels the host opens into it.

Public API::

    worker = WorkerService(backend, state_dir=..., threads=4, on_change=f)
    await worker.start()          # rpc-server on 127.0.0.1:<free port>, supervised
    worker.port; worker.state     # "stopped" | "starting" | "ready" | "crashed" | "backoff"
    worker.set_host(host_id)      # the host of this node's current plan (None: no plan)
    await worker.serve_tunnel(peer_id, open_tunnel, reader, writer)
    await worker.stop()

rpc-server has no authentication: whoever reaches its port controls this
machine's memory and compute. It listens on 127.0.0.1 only, and a tunnel
stream is connected to it only when it comes from the host of the current
plan: an authenticated peer that is not the host (or a host of a plan this
node has not reached yet, for at most ``HOST_CONVERGE_S``) is refused.
Every node runs one, the host included: a CPU-only host holds its share of
the layers through its own rpc-server, reached directly over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh_inference.core.messages import OpenTunnel
from mesh_inference.core.rpc import encode_manifest
from mesh_inference.engine.backends import EngineBackend
from mesh_inference.engine.supervisor import ProcessSupervisor, SupervisorEvent, SupervisorState
from mesh_inference.net.addresses import free_tcp_port
from mesh_inference.net.tunnel import TransformFactory, bridge_to_local

log = logging.getLogger(__name__)

# The host and its workers compute the plan from their own membership views,
# which converge within a heartbeat or two; a tunnel that arrives just before
# this node's plan names its opener as host waits this long before refusal.
HOST_CONVERGE_S = 3.0
SERVICE = "rpc"


class WorkerService:
    def __init__(
        self,
        backend: EngineBackend,
        *,
        state_dir: Path,
        threads: int,
        on_change: Callable[[], None],
        host_converge_s: float = HOST_CONVERGE_S,
        transforms: Callable[[], TransformFactory | None] = lambda: None,
        manifest: Callable[[], bytes | None] = lambda: None,
    ) -> None:
        self._transforms = transforms
        self._manifest = manifest  # this node's tensor digests (core.rpc manifest)
        self._backend = backend
        self._state_dir = state_dir
        self._threads = threads
        self._on_change = on_change
        self._host_converge_s = host_converge_s
        self._host: str | None = None
        self._host_changed = asyncio.Event()
        self._supervisor: ProcessSupervisor | None = None
        self.port = 0
        self.refused = 0  # tunnels refused because they did not come from the host

    @property
    def state(self) -> SupervisorState:
        return self._supervisor.state if self._supervisor is not None else "stopped"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        self.port = free_tcp_port()
        # No rpc-server weight cache (-c): weights come from this node's own GGUF by
        # reference (core/rpc.py), and -c would trust its files without re-hashing and
        # keep a second copy of every large tensor (measured: 29 MB of SmolLM2's 98 MB on
        # the host's own rpc-server). Older versions left one here: it goes.
        shutil.rmtree(self._state_dir / "rpc-cache", ignore_errors=True)
        self._supervisor = ProcessSupervisor(
            "rpc-server",
            log_path=self._state_dir / "rpc-server.log",
            health_url=None,
            health_tcp=("127.0.0.1", self.port),
            on_event=self._on_event,
        )
        argv = self._backend.rpc_server_command(
            port=self.port, threads=self._threads, cache_dir=None
        )
        await self._supervisor.start(argv, self._backend.env(None))

    def _on_event(self, event: SupervisorEvent) -> None:
        log.info("worker: %s", event)
        self._on_change()

    def set_host(self, host_id: str | None) -> None:
        if host_id != self._host:
            self._host = host_id
            self._host_changed.set()
            self._host_changed = asyncio.Event()

    async def _wait_for_host(self, peer_id: str) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._host_converge_s
        while self._host != peer_id:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._host_changed.wait(), remaining)
        return True

    async def serve_tunnel(
        self, peer_id: str, msg: OpenTunnel, reader: asyncio.StreamReader, writer: Any
    ) -> None:
        """Bridge one tunnel stream to the local rpc-server, if ``peer_id`` may use it."""
        if msg.service != SERVICE:
            log.warning("peer %s asked for unknown service %r", peer_id, msg.service)
            writer.close()
            return
        if not await self._wait_for_host(peer_id):
            self.refused += 1
            log.warning(
                "refused a tunnel from %s: not the host of this node's plan (%s)",
                peer_id,
                self._host,
            )
            writer.close()
            return
        if not self.ready:
            writer.close()
            return
        if msg.manifest:
            # Which tensors this node's own file has: the host sends references for
            # those and the bytes of the rest.
            writer.write(encode_manifest(self._manifest() or b""))
        await bridge_to_local(
            reader, writer, "127.0.0.1", self.port, transforms=self._transforms()
        )

    async def stop(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.stop()
