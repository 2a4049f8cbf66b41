"""LAN discovery with zeroconf (mDNS/DNS-SD).

Each node advertises ``<node id>._mesh-inference._udp.local.`` with its QUIC
port. The TXT record carries a *hash* of the mesh id, so a listener learns
which mesh a node belongs to without learning anything that lets it join:
joining still needs the secret, proven in the QUIC handshake.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # zeroconf costs ~12 MB of memory: imported only when mDNS starts
    from zeroconf import ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPE = "_mesh-inference._udp.local."
log = logging.getLogger(__name__)


def mesh_tag(mesh_id: str) -> str:
    return hashlib.sha256(b"mesh-inference/mdns/" + mesh_id.encode()).hexdigest()[:16]


class Discovery:
    """Advertise this node and report peers of the same mesh as ``host:port`` addresses."""

    def __init__(
        self,
        *,
        node_id: str,
        mesh_id: str,
        quic_port: int,
        addresses: list[str],
        on_found: Callable[[str, list[str]], None],
        interfaces: list[str] | None = None,
    ) -> None:
        self._interfaces = interfaces
        self._node_id = node_id
        self._tag = mesh_tag(mesh_id)
        self._port = quic_port
        self._addresses = addresses
        self._on_found = on_found
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        if self._interfaces:
            self._azc = AsyncZeroconf(ip_version=IPVersion.V4Only, interfaces=self._interfaces)
        else:
            self._azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self._node_id}.{SERVICE_TYPE}",
            port=self._port,
            addresses=[socket.inet_aton(a) for a in self._addresses],
            properties={"id": self._node_id, "mesh": self._tag, "v": "1"},
        )
        await self._azc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        from zeroconf import ServiceStateChange

        # Called on the event loop: resolve asynchronously, never block it.
        if state_change is not ServiceStateChange.Added:
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        if self._azc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        try:
            if await info.async_request(self._azc.zeroconf, 3000):
                self._report(info)
        except Exception as exc:  # a malformed announcement must not hurt us
            log.debug("mDNS: cannot resolve %s: %s", name, exc)

    def _report(self, info: object) -> None:
        props = getattr(info, "properties", None) or {}
        peer_id = (props.get(b"id") or b"").decode("ascii", "replace")
        tag = (props.get(b"mesh") or b"").decode("ascii", "replace")
        if tag != self._tag or peer_id == self._node_id or not peer_id:
            return
        port = getattr(info, "port", None)
        parsed: list[str] = getattr(info, "parsed_addresses", list)()
        if not port or not parsed:
            return
        addrs = [f"{a}:{port}" for a in parsed if ":" not in a]
        if addrs:
            log.info("mDNS found node %s at %s", peer_id, addrs)
            self._on_found(peer_id, addrs)

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            if self._info is not None:
                await self._azc.async_unregister_service(self._info)
            await self._azc.async_close()
        self._azc = None
