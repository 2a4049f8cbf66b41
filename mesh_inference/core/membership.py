"""Who is alive: heartbeats, gossip merge, suspect → dead. Sans-I/O.

Public API:

- :class:`MembershipTimers` -- the timing parameters;
- :class:`Membership` -- the core. Feed it what the transport saw
  (``handle_connected``, ``handle_disconnected``, ``handle_heartbeat``,
  ``handle_gossip``, ``handle_goodbye``), local changes (``update_local``,
  ``leave``) and time (``get_timer``/``handle_timer``); drain
  ``next_event()`` and ``pop_outgoing()`` after every call;
- events :class:`PeerJoined`, :class:`PeerUpdated`, :class:`PeerSuspected`,
  :class:`PeerRecovered`, :class:`PeerDied`, :class:`PeerLeft`,
  :class:`PeerDiscovered` (``MembershipEvent`` is their union);
- :class:`Outgoing` -- a message for one connected peer;
- ``first_incarnation(boot)`` -- where a node's ``boot``-th life starts counting.

Liveness is decided by direct observation only. The mesh is a full mesh
of a few machines: every pair holds one authenticated connection and
exchanges heartbeats, so only a peer's own silence can get it declared
dead -- never a slow third party's opinion. Gossip is for learning which
nodes exist (``PeerDiscovered`` → dial them) and what they offer; about a
node we saw die or leave it counts only with a newer incarnation (a restart),
so stale gossip never brings a ghost back (a dead peer someone vouches for is
only worth a dial, at most every ``forget_after``).

Peer states (``status_of``): ``pending`` (connected, its own record not
received yet), ``alive``, ``suspect``, ``dead``, ``left``, and ``known``
(heard of through gossip, no connection yet). Only ``alive``/``suspect``
peers count as members. Messages from a peer that is not connected (no
``handle_connected`` yet, or after a disconnect/goodbye) are ignored: they
are stragglers of a connection that is gone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from mesh_inference.core.messages import (
    MAX_INCARNATION,
    MAX_RECORDS,
    Goodbye,
    Gossip,
    Heartbeat,
    MemberRecord,
    NodeInfo,
    is_node_id,
)

__all__ = [
    "BOOT_SHIFT",
    "MAX_PEERS",
    "Membership",
    "MembershipEvent",
    "MembershipTimers",
    "Outgoing",
    "PeerDied",
    "PeerDiscovered",
    "PeerJoined",
    "PeerLeft",
    "PeerRecovered",
    "PeerSuspected",
    "PeerUpdated",
    "first_incarnation",
]

# A peer could gossip any number of invented node ids; past this many we
# stop learning new ones (a real mesh is a few machines).
MAX_PEERS = 1024
# A life's own bumps (info changes) stay below the next boot's first incarnation.
BOOT_SHIFT = 32


def first_incarnation(boot: int) -> int:
    """The incarnation a node's ``boot``-th start begins at: above any of its earlier lives.

    The node counts its starts in its state dir (``machine.state.next_boot``), so
    a restart under the same key supersedes what peers remember of the old life.
    """
    if boot < 0:
        raise ValueError("boot must not be negative")
    return min(boot, MAX_INCARNATION >> BOOT_SHIFT) << BOOT_SHIFT


@dataclass(frozen=True, slots=True)
class MembershipTimers:
    """Timing, in seconds. Detection of a silent peer takes at most
    ``dead_after`` plus one heartbeat interval."""

    heartbeat_interval: float = 0.25
    suspect_after: float = 0.9
    dead_after: float = 1.8
    gossip_interval: float = 1.0
    # A node only heard of through gossip is forgotten (its dial attempts
    # may stop) when no peer has mentioned it for this long.
    forget_after: float = 5.0

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "suspect_after", "dead_after", "gossip_interval",
                     "forget_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not self.heartbeat_interval < self.suspect_after < self.dead_after:
            raise ValueError("need heartbeat_interval < suspect_after < dead_after")
        if not self.forget_after > self.gossip_interval:
            raise ValueError("forget_after must exceed gossip_interval")


# ---------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class PeerJoined:
    info: NodeInfo


@dataclass(frozen=True, slots=True)
class PeerUpdated:
    info: NodeInfo


@dataclass(frozen=True, slots=True)
class PeerSuspected:
    node_id: str


@dataclass(frozen=True, slots=True)
class PeerRecovered:
    node_id: str


@dataclass(frozen=True, slots=True)
class PeerDied:
    node_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerLeft:
    node_id: str


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    """A node we have no connection to exists (learned through gossip): dial it."""

    info: NodeInfo


MembershipEvent = (
    PeerJoined | PeerUpdated | PeerSuspected | PeerRecovered | PeerDied | PeerLeft | PeerDiscovered
)


@dataclass(frozen=True, slots=True)
class Outgoing:
    peer_id: str
    message: Heartbeat | Gossip | Goodbye


@dataclass(slots=True)
class _Peer:
    node_id: str
    info: NodeInfo | None = None
    incarnation: int = 0
    status: str = "known"
    connected: bool = False
    # Its own record arrived on the current connection (or the transport
    # gave us its info): only then can it join.
    info_fresh: bool = False
    member: bool = False  # joined at least once: shown in records() even when dead
    last_heard: float | None = None
    last_mentioned: float = 0.0
    last_hint: float | None = None  # last dial hint for a dead peer that others vouch for


_MEMBER_STATUSES = ("alive", "suspect")


class Membership:
    def __init__(
        self,
        local: NodeInfo,
        now: float,
        timers: MembershipTimers | None = None,
        *,
        incarnation: int = 0,
    ) -> None:
        """``incarnation``: where this life starts counting (``first_incarnation(boot)``)."""
        if not 0 <= incarnation <= MAX_INCARNATION:
            raise ValueError(f"incarnation {incarnation} is out of range")
        self._local = local
        self._incarnation = incarnation
        self.timers = timers if timers is not None else MembershipTimers()
        self._peers: dict[str, _Peer] = {}
        self._events: deque[MembershipEvent] = deque()
        self._outgoing: list[Outgoing] = []
        # Peers owed a Gossip; built when the output is drained, so one
        # message carries the state after every change of that call.
        self._gossip_to: set[str] = set()
        self._next_heartbeat = now + self.timers.heartbeat_interval
        self._next_gossip = now + self.timers.gossip_interval
        self._left = False

    # ------------------------------------------------------------ queries
    @property
    def local(self) -> NodeInfo:
        return self._local

    @property
    def node_id(self) -> str:
        return self._local.node_id

    @property
    def incarnation(self) -> int:
        return self._incarnation

    def alive_members(self) -> list[NodeInfo]:
        """This node and every alive or suspect peer (suspect still counts until dead)."""
        infos = [self._local]
        for p in self._peers.values():
            if p.status in _MEMBER_STATUSES and p.info is not None:
                infos.append(p.info)
        return sorted(infos, key=lambda i: i.node_id)

    def records(self) -> list[MemberRecord]:
        """This node and every peer that has ever joined, with its current status.

        A former member that gossip says is back but that we have not
        reconnected to yet is shown ``dead``: that is what we saw last.
        """
        out = [MemberRecord(self._local, self._incarnation, "alive")]
        for p in self._peers.values():
            if p.member and p.info is not None:
                status = p.status if p.status in ("alive", "suspect", "dead", "left") else "dead"
                out.append(MemberRecord(p.info, p.incarnation, status))
        return sorted(out, key=lambda r: r.info.node_id)

    def known_peers(self) -> list[NodeInfo]:
        """Nodes heard of through gossip that we are not connected to."""
        return sorted(
            (p.info for p in self._peers.values() if p.status == "known" and p.info is not None),
            key=lambda i: i.node_id,
        )

    def last_heard(self, peer_id: str) -> float | None:
        p = self._peers.get(peer_id)
        return None if p is None else p.last_heard

    def status_of(self, peer_id: str) -> str | None:
        """alive/suspect/dead/left/pending/known, or None for a node never heard of."""
        if peer_id == self._local.node_id:
            return "left" if self._left else "alive"
        p = self._peers.get(peer_id)
        return None if p is None else p.status

    def is_connected(self, peer_id: str) -> bool:
        p = self._peers.get(peer_id)
        return p is not None and p.connected

    # ------------------------------------------------------------ output
    def next_event(self) -> MembershipEvent | None:
        return self._events.popleft() if self._events else None

    def pop_outgoing(self) -> list[Outgoing]:
        if self._gossip_to and not self._left:
            g = self._gossip()
            for pid in sorted(self._gossip_to):
                p = self._peers.get(pid)
                if p is not None and p.connected:
                    self._outgoing.append(Outgoing(pid, g))
        self._gossip_to.clear()
        out, self._outgoing = self._outgoing, []
        return out

    # ------------------------------------------------------------ transport input
    def handle_connected(self, peer: NodeInfo | str, now: float) -> None:
        """The transport authenticated a connection to ``peer``.

        Pass the peer's ``NodeInfo`` if the transport already has it; with
        just its node id the peer is ``pending`` until its own gossip record
        arrives (sent first thing on every connection).
        """
        if self._left:
            return
        peer_id = peer.node_id if isinstance(peer, NodeInfo) else peer
        if not is_node_id(peer_id):
            raise ValueError(f"{peer_id!r} is not a node id")
        if peer_id == self._local.node_id:
            return
        p = self._peer(peer_id, create=True)
        if p is None:
            return
        p.connected = True
        if p.status not in _MEMBER_STATUSES:
            # What we knew of it may predate a restart: wait for its own record.
            p.status = "pending"
            p.info_fresh = False
        if isinstance(peer, NodeInfo):
            self._apply_own_info(p, peer, p.incarnation)
        self._heard(p, now)
        # Keep the schedule: a fresh link gets a heartbeat at the next tick.
        if self._next_heartbeat < now:
            self._next_heartbeat = now + self.timers.heartbeat_interval
        if self._next_gossip < now:
            self._next_gossip = now + self.timers.gossip_interval
        self._send_gossip([peer_id])

    def handle_disconnected(self, peer_id: str, now: float, reason: str) -> None:
        """The connection is gone without a Goodbye: the peer is dead at once."""
        p = self._peers.get(peer_id)
        if p is None or not p.connected or self._left:
            return  # after our own Goodbye the connections close: nobody died
        p.connected = False
        p.info_fresh = False
        if p.status in _MEMBER_STATUSES:
            self._die(p, reason or "connection lost")
        elif p.status == "pending":
            p.status = "dead"

    def handle_heartbeat(self, peer_id: str, hb: Heartbeat, now: float) -> None:
        p = self._connected(peer_id)
        if p is None:
            return
        # A higher incarnation announces new info; its gossip follows, so
        # the heartbeat itself only proves the peer is alive.
        self._heard(p, now)

    def handle_gossip(self, peer_id: str, g: Gossip, now: float) -> None:
        p = self._connected(peer_id)
        if p is None:
            return
        for rec in g.records:
            nid = rec.info.node_id
            if nid == self._local.node_id:
                self._maybe_refute(rec)
            elif nid == peer_id:
                self._apply_own_info(p, rec.info, rec.incarnation)
            else:
                self._apply_hearsay(rec, now)
        self._heard(p, now)

    def handle_goodbye(self, peer_id: str, now: float) -> None:
        p = self._connected(peer_id)
        if p is None:
            return
        p.connected = False
        p.info_fresh = False
        p.last_heard = now
        was_member = p.status in _MEMBER_STATUSES
        p.status = "left"
        if was_member:
            self._events.append(PeerLeft(p.node_id))

    # ------------------------------------------------------------ local input
    def update_local(self, info: NodeInfo, now: float) -> None:
        """Our own info changed: bump the incarnation so it wins everywhere, gossip now."""
        if info.node_id != self._local.node_id:
            raise ValueError("update_local cannot change the node id")
        if info == self._local or self._left:
            return
        self._local = info
        self._bump_incarnation(self._incarnation)

    def leave(self, now: float, reason: str = "leaving") -> None:
        """Say Goodbye to every connected peer; the core stays silent afterwards."""
        if self._left:
            return
        self._left = True
        self._gossip_to.clear()
        for p in self._sorted_peers():
            if p.connected:
                self._outgoing.append(Outgoing(p.node_id, Goodbye(reason)))

    # ------------------------------------------------------------ timers
    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next run (absolute, same clock as ``now``)."""
        if self._left:
            return None
        deadlines: list[float] = []
        if any(p.connected for p in self._peers.values()):
            deadlines += [self._next_heartbeat, self._next_gossip]
        for p in self._peers.values():
            d = self._deadline(p)
            if d is not None:
                deadlines.append(d)
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        if self._left:
            return
        t = self.timers
        for p in self._sorted_peers():
            if p.status == "known":
                if now >= p.last_mentioned + t.forget_after:
                    p.status = "dead"  # no one vouches for it any more: stop dialling
                continue
            if not p.connected or p.last_heard is None:
                continue
            if p.status in _MEMBER_STATUSES and now >= p.last_heard + t.dead_after:
                self._die(p, f"no heartbeat for {now - p.last_heard:.2f} s")
            elif p.status == "alive" and now >= p.last_heard + t.suspect_after:
                p.status = "suspect"
                self._events.append(PeerSuspected(p.node_id))
            elif p.status == "pending" and now >= p.last_heard + t.dead_after:
                p.status = "dead"  # never told us who it is; nothing to announce
        connected = [p.node_id for p in self._sorted_peers() if p.connected]
        if now >= self._next_heartbeat:
            for pid in connected:
                self._outgoing.append(Outgoing(pid, Heartbeat(self._incarnation)))
            self._next_heartbeat += t.heartbeat_interval
            if self._next_heartbeat <= now:  # we were not called for a while: no burst
                self._next_heartbeat = now + t.heartbeat_interval
        if now >= self._next_gossip:
            self._send_gossip(connected)
            self._next_gossip = now + t.gossip_interval

    # ------------------------------------------------------------ internals
    def _deadline(self, p: _Peer) -> float | None:
        t = self.timers
        if p.status == "known":
            return p.last_mentioned + t.forget_after
        if not p.connected or p.last_heard is None:
            return None
        if p.status == "alive":
            return p.last_heard + t.suspect_after
        if p.status in ("suspect", "pending"):
            return p.last_heard + t.dead_after
        return None  # dead on a live connection: waits for the peer to speak again

    def _sorted_peers(self) -> list[_Peer]:
        return [self._peers[k] for k in sorted(self._peers)]

    def _peer(self, peer_id: str, *, create: bool) -> _Peer | None:
        p = self._peers.get(peer_id)
        if p is None and create and len(self._peers) < MAX_PEERS:
            p = self._peers[peer_id] = _Peer(peer_id)
        return p

    def _connected(self, peer_id: str) -> _Peer | None:
        if self._left:
            return None
        p = self._peers.get(peer_id)
        return p if p is not None and p.connected else None

    def _heard(self, p: _Peer, now: float) -> None:
        p.last_heard = now
        if p.status == "suspect":
            p.status = "alive"
            self._events.append(PeerRecovered(p.node_id))
        elif p.status in ("pending", "dead") and p.info_fresh and p.info is not None:
            p.status = "alive"
            p.member = True
            self._events.append(PeerJoined(p.info))
            self._send_gossip(self._connected_ids())  # others may not know it yet
        elif p.status == "dead":
            p.status = "pending"

    def _die(self, p: _Peer, reason: str) -> None:
        p.status = "dead"
        self._events.append(PeerDied(p.node_id, reason))

    def _apply_own_info(self, p: _Peer, info: NodeInfo, incarnation: int) -> None:
        # A peer is the authority on itself, whatever the incarnation: after
        # a restart it counts from 0 again but its info is the current one.
        changed = p.info is not None and p.info != info
        p.info = info
        p.incarnation = incarnation
        p.info_fresh = True
        if changed and p.status in _MEMBER_STATUSES:
            self._events.append(PeerUpdated(info))
            self._send_gossip(self._connected_ids())

    def _apply_hearsay(self, rec: MemberRecord, now: float) -> None:
        """A record about a third node: only used to learn of nodes to dial."""
        if rec.status not in _MEMBER_STATUSES:
            return  # another node's view of its death is not evidence for us
        q = self._peers.get(rec.info.node_id)
        if q is not None and q.connected:
            return  # we observe it directly
        if q is None:
            q = self._peer(rec.info.node_id, create=True)
            if q is None:
                return
            q.info, q.incarnation = rec.info, rec.incarnation
            self._discovered(q, now)
        elif q.status == "known":
            q.last_mentioned = now
            if rec.incarnation > q.incarnation:
                changed = rec.info != q.info
                q.info, q.incarnation = rec.info, rec.incarnation
                if changed:  # maybe new addresses: dial again
                    self._events.append(PeerDiscovered(rec.info))
        elif q.status in ("dead", "left") and rec.incarnation > q.incarnation:
            # A new life of a node we saw die or leave (a restart counts from a
            # higher boot incarnation, see ``first_incarnation``): dial it, with
            # that peer's copy of its info.
            q.info, q.incarnation = rec.info, rec.incarnation
            self._discovered(q, now)
        elif q.status == "dead" and q.info is not None and (
            q.last_hint is None or now >= q.last_hint + self.timers.forget_after
        ):
            # The same life, vouched for by a node that has not noticed its death
            # (or that still reaches it across a partition of ours): stale for our
            # view, which only our own connection can change, so it stays dead and
            # a kill -9 leaves no ghost. Worth a dial, though, now and then: if it
            # does answer, it rejoins by direct observation.
            q.last_hint = now
            self._events.append(PeerDiscovered(q.info))

    def _discovered(self, q: _Peer, now: float) -> None:
        assert q.info is not None
        q.status = "known"
        q.last_mentioned = now
        self._events.append(PeerDiscovered(q.info))

    def _maybe_refute(self, rec: MemberRecord) -> None:
        ours = self._incarnation
        if rec.incarnation > ours or (
            rec.incarnation == ours and (rec.status != "alive" or rec.info != self._local)
        ):
            self._bump_incarnation(rec.incarnation)

    def _bump_incarnation(self, above: int) -> None:
        if above >= MAX_INCARNATION:
            return  # cannot go higher; a peer that claims this is lying
        self._incarnation = above + 1
        self._send_gossip(self._connected_ids())

    def _connected_ids(self) -> list[str]:
        return [p.node_id for p in self._sorted_peers() if p.connected]

    def _send_gossip(self, peer_ids: list[str]) -> None:
        self._gossip_to.update(peer_ids)

    def _gossip(self) -> Gossip:
        """Every member record we vouch for: ourselves and alive/suspect peers."""
        records = [MemberRecord(self._local, self._incarnation, "alive")]
        for p in self._sorted_peers():
            if p.status in _MEMBER_STATUSES and p.info is not None:
                records.append(MemberRecord(p.info, p.incarnation, p.status))
        return Gossip(tuple(records[:MAX_RECORDS]))
