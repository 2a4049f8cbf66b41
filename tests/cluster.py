"""A simulated mesh of Membership cores on a manual clock (test helper).

Every message between cores goes through the real wire format: the
payload through ``encode_payload``/``decode_payload`` and the frame
through a per-connection ``FrameEncoder``/``FrameDecoder``. Time is
simulated; the loop jumps from one timer deadline or delivery to the next,
so a test of seconds of mesh time runs in milliseconds and asserts on
simulated time, never on the wall clock.

Faults: ``kill`` (a silent crash: peers are not told, they must notice
the silence), ``pause`` (a stopped process: messages to it queue up and are
delivered when it resumes), ``partition`` (traffic between two nodes is
lost while their connection stays up), ``disconnect`` (the transport
reports the connection closed on both sides), ``leave`` (Goodbye),
``restart`` (a killed node starts again under its id, one boot later), and
``inject`` (a hand-made message on a link, e.g. a stale record).

With ``auto_dial`` the nodes dial like ``net.dialer.Dialer`` driven by
``node.py``: a discovered node at once, a peer declared dead again and again
(0.5 s, doubling to 5 s, for 10 minutes) until it is back or has left. With
``close_dead`` a node also closes the connection of a peer it declared dead,
as ``node.py`` does (without it, a dead peer's connection stays up, waiting
for the peer to speak again).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from mesh_inference.core.dcf import FrameDecoder, FrameEncoder
from mesh_inference.core.membership import (
    Membership,
    MembershipEvent,
    MembershipTimers,
    PeerDied,
    PeerDiscovered,
    first_incarnation,
)
from mesh_inference.core.messages import (
    Goodbye,
    Gossip,
    Heartbeat,
    NodeInfo,
    decode_payload,
    encode_payload,
    message_type,
)

E = TypeVar("E")

# net/dialer.py's schedule for a peer declared dead.
REDIAL_FIRST = 0.5
REDIAL_MAX = 5.0
REDIAL_GIVE_UP = 600.0


def node_id_for(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def make_info(
    name: str,
    *,
    memory_bytes: int = 4 << 30,
    role: str = "member",
    has_model: bool = False,
    port: int = 7000,
    model: str | None = None,
) -> NodeInfo:
    return NodeInfo(
        node_id=node_id_for(name),
        name=name,
        role=role,
        memory_bytes=memory_bytes,
        addrs=(f"127.0.0.1:{port}",),
        http_port=9337,
        model=model,
        has_model=has_model,
        version="0.1.0",
    )


@dataclass
class SimNode:
    name: str
    core: Membership
    state: str = "running"  # running | paused | killed
    paused_until: float = 0.0
    inbox: list[tuple[Link, bytes]] = field(default_factory=list)
    events: list[tuple[float, MembershipEvent]] = field(default_factory=list)
    received: list[tuple[float, str, object]] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.core.node_id


class Link:
    """One connection between two nodes: a fresh codec pair per direction."""

    def __init__(self, a: str, b: str) -> None:
        self.ends = frozenset((a, b))
        self.open = True
        self.encoders = {a: FrameEncoder(), b: FrameEncoder()}  # keyed by sender
        self.decoders = {a: FrameDecoder(), b: FrameDecoder()}  # keyed by receiver


class Cluster:
    def __init__(
        self,
        timers: MembershipTimers | None = None,
        *,
        latency: float = 0.001,
        auto_dial: bool = True,
        start: float = 1000.0,
        connect_with_info: bool = False,
        close_dead: bool = False,
    ) -> None:
        self.close_dead = close_dead
        self.timers = timers or MembershipTimers()
        self.latency = latency
        self.auto_dial = auto_dial
        self.connect_with_info = connect_with_info
        self.now = start
        self.nodes: dict[str, SimNode] = {}
        self._by_id: dict[str, str] = {}
        self._links: dict[frozenset[str], Link] = {}
        self._partitions: set[frozenset[str]] = set()
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._boots: dict[str, int] = {}
        self.frames_sent = 0

    # ------------------------------------------------------------ set-up
    def add(self, name: str, **info_kwargs: object) -> SimNode:
        info = make_info(name, **info_kwargs)  # type: ignore[arg-type]
        return self.add_info(name, info)

    def add_info(self, name: str, info: NodeInfo) -> SimNode:
        node = SimNode(name, Membership(info, self.now, self.timers))
        self.nodes[name] = node
        self._by_id[info.node_id] = name
        self._boots[name] = 0
        return node

    def restart(
        self, name: str, info: NodeInfo | None = None, *, boot: int | None = None
    ) -> SimNode:
        """A crashed node starts again: a new core, same node id, the next boot's incarnation.

        ``boot=0`` models a node that lost its boot count (it starts at incarnation 0).
        """
        old = self.nodes[name]
        self.kill(name)
        self._boots[name] = self._boots[name] + 1 if boot is None else boot
        core = Membership(info or old.core.local, self.now, self.timers,
                          incarnation=first_incarnation(self._boots[name]))  # fmt: skip
        node = SimNode(name, core)
        self.nodes[name] = node
        return node

    def name_of(self, node_id: str) -> str:
        return self._by_id[node_id]

    def id(self, name: str) -> str:
        return self.nodes[name].node_id

    def full_mesh(self) -> None:
        names = sorted(self.nodes)
        for a, b in itertools.combinations(names, 2):
            self.connect(a, b)

    # ------------------------------------------------------------ faults and actions
    def connect(self, a: str, b: str) -> None:
        key = frozenset((a, b))
        if key in self._links or self.nodes[a].state == "killed" or self.nodes[b].state == "killed":
            return
        self._links[key] = Link(a, b)
        for x, y in ((a, b), (b, a)):
            core = self.nodes[x].core
            peer = self.nodes[y].core
            core.handle_connected(peer.local if self.connect_with_info else peer.node_id, self.now)
            self._pump(x)

    def disconnect(self, a: str, b: str, reason: str = "connection closed") -> None:
        link = self._links.pop(frozenset((a, b)), None)
        if link is None:
            return
        link.open = False
        for x, y in ((a, b), (b, a)):
            if self.nodes[x].state == "running":
                self.nodes[x].core.handle_disconnected(self.id(y), self.now, reason)
                self._pump(x)

    def connected(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._links

    def partition(self, a: str, b: str) -> None:
        self._partitions.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        self._partitions.discard(frozenset((a, b)))

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        node.state = "killed"
        node.inbox.clear()
        for key in [k for k in self._links if name in k]:
            # The peers' transports do not notice (no close was sent): they
            # must detect the silence; our own new incarnation dials afresh.
            self._links.pop(key).open = False

    def pause(self, name: str, duration: float) -> None:
        node = self.nodes[name]
        node.state = "paused"
        node.paused_until = self.now + duration
        self._at(node.paused_until, lambda: self._resume(name))

    def leave(self, name: str) -> None:
        self.nodes[name].core.leave(self.now)
        self._pump(name)

    def inject(self, src: str, dst: str, msg: Heartbeat | Gossip | Goodbye) -> None:
        """``src`` sends ``msg`` to ``dst`` on their link (as any frame: real codec, latency)."""
        self._send(src, dst, msg)

    def update_local(self, name: str, info: NodeInfo) -> None:
        self.nodes[name].core.update_local(info, self.now)
        self._pump(name)

    # ------------------------------------------------------------ time
    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until(self, t: float) -> None:
        steps = 0
        while True:
            steps += 1
            assert steps < 1_000_000, "simulation does not make progress"
            when, what = self._next_step()
            if when is None or when > t:
                self.now = t
                return
            self.now = max(self.now, when)
            what()

    def _next_step(self) -> tuple[float | None, Callable[[], None]]:
        best: float | None = None
        action: Callable[[], None] = lambda: None  # noqa: E731
        if self._queue:
            best = self._queue[0][0]
            action = self._pop_queue
        for name in sorted(self.nodes):
            node = self.nodes[name]
            if node.state != "running":
                continue
            deadline = node.core.get_timer()
            if deadline is not None and (best is None or deadline < best):
                best = deadline
                action = self._timer_action(name)
        return best, action

    def _pop_queue(self) -> None:
        _, _, fn = heapq.heappop(self._queue)
        fn()

    def _timer_action(self, name: str) -> Callable[[], None]:
        def fire() -> None:
            core = self.nodes[name].core
            core.handle_timer(self.now)
            after = core.get_timer()
            assert after is None or after > self.now, f"{name}: timer did not advance"
            self._pump(name)

        return fire

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), fn))

    # ------------------------------------------------------------ plumbing
    def _pump(self, name: str) -> None:
        node = self.nodes[name]
        while (event := node.core.next_event()) is not None:
            node.events.append((self.now, event))
            if isinstance(event, PeerDiscovered) and self.auto_dial:
                target = self._by_id.get(event.info.node_id)
                if target is not None:
                    self._at(self.now + self.latency, functools.partial(self._dial, name, target))
            elif isinstance(event, PeerDied):
                target = self._by_id.get(event.node_id)
                if target is not None and self.close_dead:
                    self._at(self.now, functools.partial(self._close_dead, name, target))
                if target is not None and self.auto_dial:
                    retry = functools.partial(
                        self._redial, node, target, REDIAL_FIRST, self.now + REDIAL_GIVE_UP
                    )
                    self._at(self.now + REDIAL_FIRST, retry)
        for out in node.core.pop_outgoing():
            self._send(name, self.name_of(out.peer_id), out.message)

    def _dial(self, a: str, b: str) -> None:
        if self.nodes[a].state != "running" or self.nodes[b].state == "killed":
            return
        if frozenset((a, b)) in self._partitions:
            return
        self.connect(a, b)

    def _close_dead(self, name: str, target: str) -> None:
        """``name`` closes its connection to a peer it declared dead (node.py does)."""
        if self.connected(name, target):
            self.disconnect(name, target, "declared dead")
        elif self.nodes[name].state == "running":
            # The link already went with a killed peer; our transport closes its end.
            self.nodes[name].core.handle_disconnected(self.id(target), self.now, "declared dead")
            self._pump(name)

    def _redial(self, node: SimNode, target: str, delay: float, give_up: float) -> None:
        """The dialer of ``node`` knocks on a peer it declared dead (node.py → Dialer.peer_died)."""
        if self.nodes[node.name] is not node or node.state == "killed" or self.now > give_up:
            return  # that life of the dialing node is over, or it gave up
        if self.connected(node.name, target):
            return
        if node.core.status_of(self.id(target)) == "left":
            return
        peer = self.nodes[target]
        reachable = frozenset((node.name, target)) not in self._partitions
        if peer.state == "running" and node.state == "running" and reachable:
            self.connect(node.name, target)
            return
        delay = min(delay * 2, REDIAL_MAX)
        self._at(self.now + delay, functools.partial(self._redial, node, target, delay, give_up))

    def _send(self, src: str, dst: str, msg: Heartbeat | Gossip | Goodbye) -> None:
        link = self._links.get(frozenset((src, dst)))
        if link is None or frozenset((src, dst)) in self._partitions:
            return  # lost before it was framed, so the stream has no gap
        payload = encode_payload(msg)
        data = link.encoders[src].encode(message_type(msg), payload, int(self.now * 1e6))
        self.frames_sent += 1
        self._at(self.now + self.latency, lambda: self._deliver(link, src, dst, data))

    def _deliver(self, link: Link, src: str, dst: str, data: bytes) -> None:
        node = self.nodes[dst]
        if not link.open or node.state == "killed":
            return
        if node.state == "paused":
            node.inbox.append((link, data))
            return
        self._receive(link, src, dst, data)

    def _receive(self, link: Link, src: str, dst: str, data: bytes) -> None:
        node = self.nodes[dst]
        src_id = self.id(src)
        for frame in link.decoders[dst].feed(data):
            msg = decode_payload(frame.type, frame.payload)
            node.received.append((self.now, src, msg))
            if isinstance(msg, Heartbeat):
                node.core.handle_heartbeat(src_id, msg, self.now)
            elif isinstance(msg, Gossip):
                node.core.handle_gossip(src_id, msg, self.now)
            elif isinstance(msg, Goodbye):
                node.core.handle_goodbye(src_id, self.now)
                # The leaver closes its connections right after its Goodbyes.
                self._at(self.now, lambda: self.disconnect(src, dst, "closed after goodbye"))
            else:
                raise AssertionError(f"unexpected message on a control stream: {msg!r}")
        self._pump(dst)

    def _resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.state != "paused":
            return
        node.state = "running"
        inbox, node.inbox = node.inbox, []
        for link, data in inbox:
            src = next(iter(link.ends - {name}))
            if link.open:
                self._receive(link, src, name, data)

    # ------------------------------------------------------------ views
    def alive_view(self, name: str) -> set[str]:
        """Names of the members ``name`` considers alive (itself included)."""
        return {self.name_of(i.node_id) for i in self.nodes[name].core.alive_members()}

    def events_of(self, name: str, kind: type[E]) -> list[tuple[float, E]]:
        return [(t, e) for t, e in self.nodes[name].events if isinstance(e, kind)]

    def all_events(self) -> list[tuple[str, float, MembershipEvent]]:
        return [(n, t, e) for n, node in self.nodes.items() for t, e in node.events]
