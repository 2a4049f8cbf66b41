"""The node's event bus: status snapshots and other events for SSE listeners.

Public API::

    bus = EventBus(snapshot=lambda: {...})   # the first event every subscriber gets
    async for name, data in bus.subscribe(): ...
    bus.publish("model", {...}); bus.has_subscribers

A slow listener (a browser tab in the background) must not hold memory or
the loop: each subscriber has a bounded queue, and when it is full the
oldest event is dropped, so a listener loses old news, never new news.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

Event = tuple[str, dict[str, Any]]
QUEUE_SIZE = 64


class EventBus:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot
        self._subscribers: set[asyncio.Queue[Event]] = set()

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def subscribe(self) -> AsyncIterator[Event]:
        return self._subscription()

    async def _subscription(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._subscribers.add(queue)
        try:
            yield "status", self._snapshot()
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait((event, data))
