"""The asyncio edge of membership: feeds it connections, frames and time; sends what it says.

Public API::

    driver = MembershipDriver(membership, send=f(peer_id, type, payload),
                              disconnect=f(peer_id, reason), on_events=f(events))
    driver.start()                       # arms the timer
    driver.peer_connected(peer_id); driver.peer_lost(peer_id, reason)
    driver.control_frame(peer_id, frame) # Heartbeat / Gossip / Goodbye
    driver.local_changed(info)           # this node's own record changed
    await driver.leave()                 # Goodbye to everyone
    await driver.stop()

After every input the driver drains the core's events and outgoing
messages, then calls ``on_events`` once with what happened -- only when
something did (an event, a connection change, this node's own record): a
heartbeat that changes nothing costs no re-plan, which matters at four
heartbeats a second per peer. The core is never
written to while its events are being drained: ``on_events`` runs after.
The clock is ``loop.time()``; a frame that fails validation costs the peer
its connection, never the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from mesh_inference.core.dcf import Frame, MessageType, ProtocolError
from mesh_inference.core.membership import Membership, MembershipEvent
from mesh_inference.core.messages import Goodbye, Gossip, Heartbeat, NodeInfo, decode_payload
from mesh_inference.core.messages import encode_payload as _encode

log = logging.getLogger(__name__)

_TYPES = {Heartbeat: MessageType.HEARTBEAT, Gossip: MessageType.GOSSIP,
          Goodbye: MessageType.GOODBYE}  # fmt: skip
# Goodbyes are sent with no acknowledgement: give them a moment to leave.
GOODBYE_GRACE_S = 0.05
IDLE_RECHECK_S = 0.5  # with no deadline from the core


class MembershipDriver:
    def __init__(
        self,
        membership: Membership,
        *,
        send: Callable[[str, MessageType, bytes], None],
        disconnect: Callable[[str, str], None],
        on_events: Callable[[list[MembershipEvent]], None],
    ) -> None:
        self.membership = membership
        self._send = send
        self._disconnect = disconnect
        self._on_events = on_events
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._started = False
        self._stopped = False

    def start(self) -> None:
        """Start the timer (a loop.call_at handle, re-armed only when the deadline moves)."""
        self._started = True
        self._arm()

    def _now(self) -> float:
        return self._loop.time()

    # -- inputs
    def peer_connected(self, peer_id: str) -> None:
        self.membership.handle_connected(peer_id, self._now())
        self._pump(force=True)

    def peer_lost(self, peer_id: str, reason: str) -> None:
        if not self._stopped:
            self.membership.handle_disconnected(peer_id, self._now(), reason)
            self._pump(force=True)

    def control_frame(self, peer_id: str, frame: Frame) -> None:
        try:
            msg = decode_payload(frame.type, frame.payload)
        except ProtocolError as exc:
            self._disconnect(peer_id, f"protocol error: {exc}")
            return
        now = self._now()
        if isinstance(msg, Heartbeat):
            self.membership.handle_heartbeat(peer_id, msg, now)
        elif isinstance(msg, Gossip):
            self.membership.handle_gossip(peer_id, msg, now)
        elif isinstance(msg, Goodbye):
            self.membership.handle_goodbye(peer_id, now)
        else:
            self._disconnect(peer_id, f"unexpected {frame.type.name} on the control stream")
            return
        self._pump()

    def local_changed(self, info: NodeInfo) -> None:
        if info != self.membership.local:
            self.membership.update_local(info, self._now())
        self._pump(force=True)

    # -- outputs
    def _pump(self, *, force: bool = False) -> None:
        events: list[MembershipEvent] = []
        while (event := self.membership.next_event()) is not None:
            log.info("membership: %s", event)
            events.append(event)
        self._flush()
        self._arm()  # the next deadline may have moved
        if not self._stopped and (events or force):
            self._on_events(events)

    def _flush(self) -> None:
        for out in self.membership.pop_outgoing():
            # The connection may have gone away between the decision and the send.
            with contextlib.suppress(KeyError, ConnectionError):
                self._send(out.peer_id, _TYPES[type(out.message)], _encode(out.message))

    def _arm(self) -> None:
        if not self._started or self._stopped:
            return
        deadline = self.membership.get_timer()
        if deadline == self._timer_at and self._timer is not None:
            return  # unchanged: no timer churn per frame
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        # Nothing scheduled: look again in a while, as the core may only say so later.
        when = self._now() + IDLE_RECHECK_S if deadline is None else deadline
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        try:
            deadline = self.membership.get_timer()
            if deadline is not None and deadline <= self._now():
                self.membership.handle_timer(self._now())
                self._pump()  # re-arms
                return
        except Exception:
            # Heartbeats and death detection live on this timer: a bug in one round
            # must not stop them for good.
            log.exception("membership timer failed")
        self._arm()

    async def leave(self) -> None:
        self._stopped = True
        self.membership.leave(self._now())
        self._flush()
        await asyncio.sleep(GOODBYE_GRACE_S)

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
