"""Graceful leave: the API requests in flight, and refusing new ones while the node stops.

Public API::

    drain = Drain()
    with drain.track(): ...              # one API request (an HTTP /v1 call or a peer's Task)
    drain.close()                        # from now on: drain.closing is True
    idle = await drain.wait_idle(10.0)   # True once nothing is in flight; False: timed out
    drain.skip()                         # stop waiting now (a second Ctrl-C)
    shutting_down() -> ProxiedResponse   # the 503 a request gets while the node stops

``Node.stop`` closes the drain first, waits (bounded) for what is in flight,
and only then says Goodbye and stops the engine: a request that was running
when SIGTERM came completes, and a new one gets a 503 that says why (a peer
that sent it as a Task retries elsewhere, see ``api/continuity.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from mesh_inference.api.openai import error_response
from mesh_inference.net.proxy import ProxiedResponse

__all__ = ["SHUTTING_DOWN", "Drain", "shutting_down"]

SHUTTING_DOWN = (
    "This node is shutting down and takes no new requests; send the request to "
    "another node of the mesh, or retry once this node is back."
)


def shutting_down() -> ProxiedResponse:
    return error_response(503, SHUTTING_DOWN, "service_unavailable", "shutting_down")


class Drain:
    def __init__(self) -> None:
        self.closing = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._skip = asyncio.Event()

    @property
    def active(self) -> int:
        """Requests in flight."""
        return self._active

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def close(self) -> None:
        self.closing = True

    def skip(self) -> None:
        self._skip.set()

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Until no request is in flight, ``timeout`` passes or :meth:`skip` is called."""
        if self._active == 0:
            return True
        idle = asyncio.ensure_future(self._idle.wait())
        skipped = asyncio.ensure_future(self._skip.wait())
        try:
            await asyncio.wait({idle, skipped}, timeout=max(0.0, timeout),
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            idle.cancel()
            skipped.cancel()
        return self._active == 0
