"""Who to dial, when, and how often: bootstrap addresses, gossip, mDNS, re-dials.

Public API::

    dialer = Dialer(dial=endpoint.dial, connected=endpoint.peers,
                    status_of=membership.status_of, own_addrs=lambda: {"10.0.0.2:9337"})
    dialer.bootstrap(["10.0.0.1:9337"])   # join-token addresses: dialed whenever we are alone
    dialer.peer_discovered(peer_id, addrs, delay=0.0)     # learnt from gossip
    dialer.peer_died(peer_id, addrs)      # keep knocking for a while: it may only be slow
    dialer.mdns_found(peer_id, addrs)     # zeroconf saw a node of our mesh
    await dialer.close()

One dial loop per (address, peer): it retries with exponential back-off
(0.2 s doubling to 5 s) until the peer is connected, has left, or
``give_up_after`` passes. A bootstrap address is only needed while this
node has no peer at all (another of the token's addresses may have
worked), so its loop sleeps while we are connected and resumes when we are
alone again. Our own addresses are never dialed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.2
MAX_RETRY_S = 5.0
ALONE_CHECK_S = 1.0
GOSSIP_GIVE_UP_S = 60.0
DEAD_GIVE_UP_S = 600.0


class Dialer:
    def __init__(
        self,
        *,
        dial: Callable[[str], Awaitable[str]],
        connected: Callable[[], Collection[str]],
        status_of: Callable[[str], str | None],
        own_addrs: Callable[[], set[str]],
    ) -> None:
        self._dial = dial
        self._connected = connected
        self._status_of = status_of
        self._own_addrs = own_addrs
        self._active: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def bootstrap(self, addrs: Iterable[str]) -> None:
        for addr in addrs:
            self._start(addr, None, delay=0.0, give_up_after=None)

    def peer_discovered(self, peer_id: str, addrs: Iterable[str], *, delay: float = 0.0) -> None:
        for addr in addrs:
            self._start(addr, peer_id, delay=delay, give_up_after=GOSSIP_GIVE_UP_S)

    def peer_died(self, peer_id: str, addrs: Iterable[str]) -> None:
        for addr in addrs:
            self._start(addr, peer_id, delay=0.5, give_up_after=DEAD_GIVE_UP_S)

    def mdns_found(self, peer_id: str, addrs: Iterable[str]) -> None:
        if peer_id not in self._connected():
            self.peer_discovered(peer_id, addrs)

    @property
    def active(self) -> int:
        return len(self._active)

    def _start(
        self, addr: str, peer_id: str | None, *, delay: float, give_up_after: float | None
    ) -> None:
        key = f"{addr}/{peer_id}"
        if self._closed or key in self._active:
            return
        task = asyncio.ensure_future(self._loop(addr, peer_id, delay, give_up_after))
        self._active[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            if self._active.get(key) is t:
                del self._active[key]
            if not t.cancelled() and t.exception() is not None:
                log.error("dial loop for %s failed", addr, exc_info=t.exception())

        task.add_done_callback(done)

    async def _loop(
        self, addr: str, peer_id: str | None, delay: float, give_up_after: float | None
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if give_up_after is None else loop.time() + give_up_after
        if delay:
            await asyncio.sleep(delay)
        retry = FIRST_RETRY_S
        while addr not in self._own_addrs():
            if peer_id is not None:
                if peer_id in self._connected() or self._status_of(peer_id) == "left":
                    return
                if deadline is not None and loop.time() > deadline:
                    log.info("giving up dialing %s at %s", peer_id, addr)
                    return
            elif self._connected():
                await asyncio.sleep(ALONE_CHECK_S)
                retry = FIRST_RETRY_S
                continue
            try:
                got = await self._dial(addr)
            except Exception as exc:  # unreachable, refused, failed auth: all mean "later"
                log.debug("dial %s failed: %s", addr, exc)
            else:
                log.info("dialed %s: node %s", addr, got)
                if peer_id is not None:
                    return
                retry = FIRST_RETRY_S
                continue
            await asyncio.sleep(retry)
            retry = min(retry * 2, MAX_RETRY_S)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._active.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
