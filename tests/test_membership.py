"""Membership core: unit tests and simulated meshes on a manual clock (tests/cluster.py)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from cluster import Cluster, make_info, node_id_for
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mesh_inference.core.membership import (
    BOOT_SHIFT,
    MAX_PEERS,
    Membership,
    MembershipTimers,
    Outgoing,
    PeerDied,
    PeerDiscovered,
    PeerJoined,
    PeerLeft,
    PeerRecovered,
    PeerSuspected,
    PeerUpdated,
    first_incarnation,
)
from mesh_inference.core.messages import MAX_INCARNATION, Goodbye, Gossip, Heartbeat, MemberRecord

T = MembershipTimers()


def three(**kwargs: object) -> Cluster:
    c = Cluster(**kwargs)  # type: ignore[arg-type]
    for i, name in enumerate(("a", "b", "c")):
        c.add(name, port=7000 + i)
    c.full_mesh()
    c.run_for(1.0)
    return c


def drain(m: Membership) -> list[object]:
    out: list[object] = []
    while (e := m.next_event()) is not None:
        out.append(e)
    return out


# ---------------------------------------------------------------------- timers
def test_timers_are_validated() -> None:
    with pytest.raises(ValueError):
        MembershipTimers(suspect_after=2.0, dead_after=1.0)
    with pytest.raises(ValueError):
        MembershipTimers(heartbeat_interval=1.0, suspect_after=0.5)
    with pytest.raises(ValueError):
        MembershipTimers(gossip_interval=0)
    with pytest.raises(ValueError):
        MembershipTimers(gossip_interval=6.0)  # forget_after must exceed it


# ---------------------------------------------------------------------- join
@pytest.mark.parametrize("with_info", [False, True])
def test_three_nodes_join_and_agree(with_info: bool) -> None:
    c = three(connect_with_info=with_info)
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}
        joined = sorted(c.name_of(e.info.node_id) for _, e in c.events_of(name, PeerJoined))
        assert joined == sorted(set("abc") - {name})  # each peer exactly once
        assert not c.events_of(name, PeerSuspected)
        assert not c.events_of(name, PeerDied)
        assert {r.status for r in c.nodes[name].core.records()} == {"alive"}
    c.run_for(10.0)
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}
        assert len(c.events_of(name, PeerJoined)) == 2


def test_join_is_announced_quickly() -> None:
    c = Cluster()
    c.add("a")
    c.add("b")
    t0 = c.now
    c.connect("a", "b")
    c.run_for(0.1)
    # gossip goes out on connect, not at the next gossip tick
    (t, _), = c.events_of("a", PeerJoined)
    assert t - t0 <= 2 * c.latency + 1e-9


def test_heartbeats_flow_at_the_configured_interval() -> None:
    c = three()
    t0 = c.now
    c.run_for(5.0)
    hbs = [t for t, src, m in c.nodes["a"].received if src == "b" and isinstance(m, Heartbeat)
           and t > t0]
    assert 5.0 / T.heartbeat_interval - 1 <= len(hbs) <= 5.0 / T.heartbeat_interval + 1
    gaps = [b - a for a, b in itertools.pairwise(hbs)]
    assert max(gaps) <= T.heartbeat_interval + 1e-6
    gossips = [t for t, src, m in c.nodes["a"].received if src == "b" and isinstance(m, Gossip)
               and t > t0]
    assert 4 <= len(gossips) <= 6


# ---------------------------------------------------------------------- death
def test_killed_node_is_declared_dead_within_the_bound() -> None:
    c = three()
    t0 = c.now
    c.kill("c")
    c.run_for(5.0)
    for name in "ab":
        (t_sus, sus), = c.events_of(name, PeerSuspected)
        (t_dead, died), = c.events_of(name, PeerDied)
        assert sus.node_id == died.node_id == c.id("c")
        # never before the silence threshold, always within dead_after + one heartbeat
        assert t0 + T.suspect_after - T.heartbeat_interval <= t_sus < t_dead
        assert t0 + T.dead_after - T.heartbeat_interval <= t_dead
        assert t_dead <= t0 + T.dead_after + T.heartbeat_interval
        assert "no heartbeat" in died.reason
        assert c.alive_view(name) == {"a", "b"}
        assert c.nodes[name].core.status_of(c.id("c")) == "dead"
        assert not c.events_of(name, PeerRecovered)


def test_closed_connection_means_dead_at_once() -> None:
    c = three()
    t0 = c.now
    c.disconnect("a", "c", "reset by peer")
    (t, died), = c.events_of("a", PeerDied)
    assert t == t0 and died == PeerDied(c.id("c"), "reset by peer")
    (t, died), = c.events_of("c", PeerDied)
    assert died.node_id == c.id("a")
    assert c.alive_view("a") == {"a", "b"}
    assert c.alive_view("b") == {"a", "b", "c"}  # b still hears c directly


@pytest.mark.parametrize("pause", [0.3, 0.5, 0.6])
def test_paused_node_is_not_declared_dead(pause: float) -> None:
    c = three()
    c.pause("c", pause)
    c.run_for(5.0)
    for name, _t, event in c.all_events():
        assert not isinstance(event, PeerSuspected | PeerDied), (name, event)
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}


def test_long_pause_is_suspected_then_recovered_without_death() -> None:
    c = three()
    t0 = c.now
    c.pause("c", 1.2)
    c.run_for(5.0)
    for name in "ab":
        (t_sus, _), = c.events_of(name, PeerSuspected)
        (t_rec, rec), = c.events_of(name, PeerRecovered)
        assert t_sus < t0 + 1.2 <= t_rec
        assert rec.node_id == c.id("c")
        assert not c.events_of(name, PeerDied)
    assert not c.events_of("c", PeerSuspected)  # time stood still for c


def test_rejoin_after_death_by_silence() -> None:
    c = three()
    t0 = c.now
    c.pause("c", 3.0)
    c.run_for(5.0)
    for name in "ab":
        kinds = [type(e) for t, e in c.nodes[name].events if t > t0]
        assert kinds == [PeerSuspected, PeerDied, PeerJoined]
        (t_join, joined), = [(t, e) for t, e in c.events_of(name, PeerJoined) if t > t0]
        assert joined.info == c.nodes["c"].core.local
        assert t_join >= t0 + 3.0
        assert c.alive_view(name) == {"a", "b", "c"}
    assert c.alive_view("c") == {"a", "b", "c"}


def test_dropped_connection_is_redialled() -> None:
    c = three()
    c.disconnect("a", "c")
    c.run_for(1.5)  # the dialers of a and c knock again (Dialer.peer_died)
    assert c.connected("a", "c")
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}
    # c rejoined by a direct connection; b's gossip never made it a member in between
    assert [type(e) for _, e in c.nodes["a"].events if not isinstance(e, PeerDiscovered)][-2:] == [
        PeerDied, PeerJoined,
    ]


def test_rejoin_after_reconnect() -> None:
    c = three(auto_dial=False)
    c.disconnect("a", "c")
    assert c.alive_view("a") == {"a", "b"}
    c.run_for(0.5)
    c.connect("a", "c")
    c.run_for(0.5)
    assert c.alive_view("a") == {"a", "b", "c"}
    assert c.alive_view("c") == {"a", "b", "c"}
    assert [type(e) for _, e in c.nodes["a"].events][-3:] == [PeerDied, PeerDiscovered, PeerJoined]


def test_restarted_node_rejoins_with_its_new_info() -> None:
    c = three()
    c.update_local("c", replace(c.nodes["c"].core.local, name="c-old"))
    c.run_for(0.5)
    c.kill("c")  # its old life ended at incarnation 1; the new one starts at 0
    c.run_for(3.0)
    new_info = replace(make_info("c", port=7999), memory_bytes=8 << 30)
    t_restart = c.now
    c.restart("c", new_info)
    c.connect("c", "a")
    c.run_for(2.0)  # a gossips b to c → c dials b
    for name in "ab":
        last = [e for _, e in c.events_of(name, PeerJoined)][-1]
        assert last.info == new_info
        # joined with the new info straight away, no stale join then update
        assert not [e for t, e in c.events_of(name, PeerUpdated) if t > t_restart]
        assert c.alive_view(name) == {"a", "b", "c"}
    assert c.alive_view("c") == {"a", "b", "c"}
    c.run_for(5.0)
    assert [r.info for r in c.nodes["a"].core.records() if r.info.node_id == c.id("c")] == [
        new_info
    ]


def test_partition_is_judged_by_direct_observation_only() -> None:
    c = three()
    c.partition("a", "c")
    c.run_for(3.0)
    assert c.alive_view("a") == {"a", "b"}
    assert c.alive_view("c") == {"b", "c"}
    # b hears both directly: a's opinion of c cannot get c declared dead there
    assert c.alive_view("b") == {"a", "b", "c"}
    assert not c.events_of("b", PeerSuspected)
    # a is still connected to c, so b's gossip about c is no reason to re-dial
    assert not c.events_of("a", PeerDiscovered)
    c.heal("a", "c")
    c.run_for(1.0)
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}
    assert [type(e) for _, e in c.nodes["a"].events][-3:] == [PeerSuspected, PeerDied, PeerJoined]


# ---------------------------------------------------------------------- leave
def test_goodbye_removes_the_peer_at_once() -> None:
    c = three()
    t0 = c.now
    c.leave("c")
    c.run_for(5.0)
    for name in "ab":
        (t, left), = c.events_of(name, PeerLeft)
        assert left.node_id == c.id("c")
        assert t <= t0 + 2 * c.latency
        assert not c.events_of(name, PeerDied)
        assert not c.events_of(name, PeerSuspected)
        assert c.alive_view(name) == {"a", "b"}
        assert c.nodes[name].core.status_of(c.id("c")) == "left"
    core = c.nodes["c"].core
    assert core.get_timer() is None
    assert core.status_of(core.node_id) == "left"


def test_leave_sends_goodbye_to_every_connected_peer_and_then_nothing() -> None:
    a, b, d = make_info("a"), make_info("b"), make_info("d")
    m = Membership(a, 0.0)
    m.handle_connected(b.node_id, 0.0)
    m.handle_connected(d.node_id, 0.0)
    m.pop_outgoing()
    m.leave(0.1, "shutting down")
    out = m.pop_outgoing()
    bye = Goodbye("shutting down")
    assert sorted(out, key=lambda o: o.peer_id) == sorted(
        [Outgoing(b.node_id, bye), Outgoing(d.node_id, bye)], key=lambda o: o.peer_id
    )
    m.handle_timer(10.0)
    m.handle_heartbeat(b.node_id, Heartbeat(0), 10.0)
    assert m.pop_outgoing() == []
    assert drain(m) == []


# ---------------------------------------------------------------------- gossip
def test_gossip_discovers_a_third_node_which_is_then_dialled() -> None:
    c = Cluster()
    for name in "abc":
        c.add(name)
    c.connect("a", "b")
    c.connect("b", "c")
    c.run_for(1.0)
    (_, found), = c.events_of("a", PeerDiscovered)
    assert found.info == c.nodes["c"].core.local
    assert c.connected("a", "c")
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}


def test_known_node_is_not_a_member_and_is_forgotten() -> None:
    c = Cluster(auto_dial=False)
    for name in "abc":
        c.add(name)
    c.connect("a", "b")
    c.connect("b", "c")
    c.run_for(1.0)
    a = c.nodes["a"].core
    cid = c.id("c")
    assert a.status_of(cid) == "known"
    assert [i.node_id for i in a.known_peers()] == [cid]
    # liveness is direct only: a never heard from c
    assert c.alive_view("a") == {"a", "b"}
    assert cid not in {r.info.node_id for r in a.records()}
    c.kill("c")
    t0 = c.now
    c.run_for(T.dead_after + T.heartbeat_interval + T.forget_after + T.gossip_interval)
    assert a.status_of(cid) == "dead"  # nobody vouches for it: dialling may stop
    assert a.known_peers() == []
    assert c.now - t0 > T.forget_after
    assert len(c.events_of("a", PeerDiscovered)) == 1


def test_info_change_is_gossiped_with_a_higher_incarnation() -> None:
    c = three()
    a = c.nodes["a"].core
    inc = a.incarnation
    new = replace(a.local, has_model=True, model="smollm2-135m")
    t0 = c.now
    c.update_local("a", new)
    c.run_for(0.1)
    assert a.incarnation == inc + 1
    for name in "bc":
        (t, upd), = c.events_of(name, PeerUpdated)
        assert upd.info == new and t <= t0 + 2 * c.latency
        rec = next(r for r in c.nodes[name].core.records() if r.info.node_id == a.node_id)
        assert rec.incarnation == inc + 1
    c.update_local("a", new)  # unchanged: nothing to announce
    assert a.incarnation == inc + 1
    with pytest.raises(ValueError):
        a.update_local(make_info("zz"), c.now)


def test_gossip_without_change_emits_nothing() -> None:
    c = three()
    before = len(c.all_events())
    c.run_for(10.0)
    assert len(c.all_events()) == before


# ---------------------------------------------------------------------- unit level
def test_refutation_bumps_the_incarnation() -> None:
    a, b = make_info("a"), make_info("b")
    m = Membership(a, 0.0)
    m.handle_connected(b, 0.0)
    assert drain(m) == [PeerJoined(b)]
    m.pop_outgoing()
    # b claims we are suspect at our incarnation: refute
    m.handle_gossip(b.node_id, Gossip((MemberRecord(a, 0, "suspect"), MemberRecord(b, 0, "alive"))),
                    0.1)
    assert m.incarnation == 1
    out = m.pop_outgoing()
    assert len(out) == 1 and out[0].peer_id == b.node_id
    assert isinstance(out[0].message, Gossip)
    mine = [r for r in out[0].message.records if r.info.node_id == a.node_id]
    assert mine == [MemberRecord(a, 1, "alive")]
    # an older claim is stale: no bump
    m.handle_gossip(b.node_id, Gossip((MemberRecord(a, 0, "dead"),)), 0.2)
    assert m.incarnation == 1
    # a record of ours from before a restart, with a higher incarnation: go above it
    m.handle_gossip(b.node_id, Gossip((MemberRecord(a, 7, "alive"),)), 0.3)
    assert m.incarnation == 8
    # our own record, alive and current: nothing to do
    m.handle_gossip(b.node_id, Gossip((MemberRecord(a, 8, "alive"),)), 0.4)
    assert m.incarnation == 8
    # stale info about us at our incarnation also gets refuted
    m.handle_gossip(b.node_id, Gossip((MemberRecord(replace(a, name="old"), 8, "alive"),)), 0.5)
    assert m.incarnation == 9
    assert drain(m) == []


def test_pending_peer_joins_when_its_own_record_arrives() -> None:
    a, b, d = make_info("a"), make_info("b"), make_info("d")
    m = Membership(a, 0.0)
    m.handle_connected(b.node_id, 0.0)
    assert m.status_of(b.node_id) == "pending"
    assert m.alive_members() == [a]
    out = m.pop_outgoing()
    assert out == [Outgoing(b.node_id, Gossip((MemberRecord(a, 0, "alive"),)))]
    m.handle_heartbeat(b.node_id, Heartbeat(0), 0.1)
    assert drain(m) == []
    # gossip that mentions others but not b itself: still pending
    m.handle_gossip(b.node_id, Gossip((MemberRecord(d, 0, "alive"),)), 0.2)
    assert drain(m) == [PeerDiscovered(d)]
    assert m.status_of(b.node_id) == "pending"
    m.handle_gossip(b.node_id, Gossip((MemberRecord(b, 3, "alive"),)), 0.3)
    assert drain(m) == [PeerJoined(b)]
    assert sorted(i.node_id for i in m.alive_members()) == sorted([a.node_id, b.node_id])
    assert m.last_heard(b.node_id) == 0.3
    assert MemberRecord(b, 3, "alive") in m.records()


def test_pending_peer_that_stays_silent_is_dropped_quietly() -> None:
    a, b = make_info("a"), make_info("b")
    m = Membership(a, 0.0)
    m.handle_connected(b.node_id, 0.0)
    while (t := m.get_timer()) is not None and t < 5.0:
        m.handle_timer(t)
    assert m.status_of(b.node_id) == "dead"
    assert drain(m) == []


def test_messages_from_unconnected_peers_are_ignored() -> None:
    a, b = make_info("a"), make_info("b")
    m = Membership(a, 0.0)
    m.handle_heartbeat(b.node_id, Heartbeat(0), 0.0)
    m.handle_gossip(b.node_id, Gossip((MemberRecord(b, 0, "alive"),)), 0.0)
    m.handle_goodbye(b.node_id, 0.0)
    m.handle_disconnected(b.node_id, 0.0, "x")
    assert drain(m) == [] and m.pop_outgoing() == []
    assert m.status_of(b.node_id) is None and m.get_timer() is None
    # after a disconnect, a straggling heartbeat does not resurrect the peer
    m.handle_connected(b, 1.0)
    m.handle_disconnected(b.node_id, 1.1, "closed")
    assert drain(m) == [PeerJoined(b), PeerDied(b.node_id, "closed")]
    m.handle_heartbeat(b.node_id, Heartbeat(0), 1.2)
    assert drain(m) == [] and m.status_of(b.node_id) == "dead"


def test_hearsay_about_death_is_not_evidence() -> None:
    a, b, d = make_info("a"), make_info("b"), make_info("d")
    m = Membership(a, 0.0)
    m.handle_connected(b, 0.0)
    m.handle_connected(d, 0.0)
    drain(m)
    m.handle_gossip(b.node_id, Gossip((MemberRecord(d, 5, "dead"),)), 0.1)
    assert m.status_of(d.node_id) == "alive"
    assert drain(m) == []


def test_left_node_is_not_resurrected_by_stale_gossip() -> None:
    a, b, d = make_info("a"), make_info("b"), make_info("d")
    m = Membership(a, 0.0)
    m.handle_connected(b, 0.0)
    m.handle_connected(d, 0.0)
    m.handle_goodbye(d.node_id, 0.1)
    assert drain(m)[-1] == PeerLeft(d.node_id)
    m.handle_gossip(b.node_id, Gossip((MemberRecord(d, 0, "alive"),)), 0.2)
    assert m.status_of(d.node_id) == "left" and drain(m) == []
    # a newer incarnation is a new life: dial it
    d2 = replace(d, addrs=("127.0.0.1:9999",))
    m.handle_gossip(b.node_id, Gossip((MemberRecord(d2, 1, "alive"),)), 0.3)
    assert m.status_of(d.node_id) == "known"
    assert drain(m) == [PeerDiscovered(d2)]


def test_dead_node_is_not_resurrected_by_stale_gossip() -> None:
    a, b, d = make_info("a"), make_info("b"), make_info("d")
    m = Membership(a, 0.0)
    m.handle_connected(b, 0.0)
    m.handle_connected(d, 0.0)
    m.handle_gossip(d.node_id, Gossip((MemberRecord(d, 7, "alive"),)), 0.0)
    drain(m)
    m.handle_heartbeat(b.node_id, Heartbeat(0), T.dead_after - 0.1)
    m.handle_timer(T.dead_after)  # d fell silent (kill -9): dead by our own observation
    assert m.status_of(d.node_id) == "dead"
    assert m.status_of(b.node_id) in ("alive", "suspect")
    assert [type(e) for e in drain(m) if not isinstance(e, PeerSuspected)] == [PeerDied]
    m.handle_disconnected(d.node_id, T.dead_after, "declared dead")  # the node closes it
    assert drain(m) == []
    # b has not noticed yet and still vouches for that life: not a ghost, at most a dial
    m.handle_gossip(b.node_id, Gossip((MemberRecord(d, 7, "alive"),)), 2.0)
    assert m.status_of(d.node_id) == "dead" and drain(m) == [PeerDiscovered(d)]
    for inc in (0, 7):  # a hint every forget_after, no more
        m.handle_gossip(b.node_id, Gossip((MemberRecord(d, inc, "alive"),)), 2.5)
        assert m.status_of(d.node_id) == "dead" and drain(m) == []
    m.handle_gossip(b.node_id, Gossip((MemberRecord(d, 7, "alive"),)), 2.0 + T.forget_after)
    assert m.status_of(d.node_id) == "dead" and drain(m) == [PeerDiscovered(d)]
    assert [r.status for r in m.records() if r.info.node_id == d.node_id] == ["dead"]
    assert d.node_id not in {i.node_id for i in m.alive_members()}
    # its next life (a restart counts from a higher boot incarnation) is worth a dial
    d2 = replace(d, addrs=("127.0.0.1:9999",))
    m.handle_gossip(b.node_id, Gossip((MemberRecord(d2, first_incarnation(1), "alive"),)), 8.0)
    assert m.status_of(d.node_id) == "known" and drain(m) == [PeerDiscovered(d2)]
    assert d.node_id not in {i.node_id for i in m.alive_members()}  # known is not a member


def test_first_incarnation_of_each_boot_is_above_every_earlier_life() -> None:
    assert first_incarnation(0) == 0
    assert first_incarnation(1) > (1 << BOOT_SHIFT) - 1  # above any bumps of boot 0
    assert first_incarnation(2) > first_incarnation(1)
    assert first_incarnation(1 << 40) <= MAX_INCARNATION  # clamped, still valid on the wire
    with pytest.raises(ValueError):
        first_incarnation(-1)
    with pytest.raises(ValueError):
        Membership(make_info("a"), 0.0, incarnation=-1)
    m = Membership(make_info("a"), 0.0, incarnation=first_incarnation(3))
    assert m.incarnation == first_incarnation(3)
    m.update_local(replace(make_info("a"), name="renamed"), 0.0)
    assert m.incarnation == first_incarnation(3) + 1


def test_a_killed_node_stays_dead_everywhere_while_a_third_node_vouches_for_it() -> None:
    c = three(close_dead=True)  # as node.py: the dead peer's connection is closed, re-dialled
    victim = c.nodes["c"].core
    stale = Gossip((MemberRecord(victim.local, victim.incarnation, "alive"),))
    t_kill = c.now
    c.kill("c")
    # For 10 s, a third party keeps gossiping c's last alive record both ways
    # (a node that has not noticed yet, or is wrong): kill -9 must leave no ghost.
    for _ in range(40):
        c.inject("b", "a", stale)
        c.inject("a", "b", stale)
        c.run_for(0.25)
        if c.now > t_kill + T.dead_after + T.heartbeat_interval:
            for name in "ab":
                assert c.nodes[name].core.status_of(c.id("c")) == "dead", (name, c.now)
                assert c.alive_view(name) == {"a", "b"}
    for name in "ab":
        # dial hints at most (the dials fail: c is gone), never a join or a recovery
        assert [type(e) for t, e in c.nodes[name].events
                if t > t_kill and not isinstance(e, PeerDiscovered)] == [PeerSuspected, PeerDied]
        shown = {r.info.node_id: r.status for r in c.nodes[name].core.records()}
        assert shown[c.id("c")] == "dead"


def test_a_long_partition_heals_through_gossip_after_the_dialers_gave_up() -> None:
    c = three(close_dead=True)
    c.partition("a", "c")
    c.run_for(700.0)  # a and c declared each other dead; their dialers gave up after 600 s
    assert c.alive_view("a") == {"a", "b"} and c.alive_view("c") == {"b", "c"}
    assert not c.connected("a", "c")
    c.heal("a", "c")
    # b still vouches for each to the other: a dial hint, and the direct connection decides
    c.run_for(T.forget_after + 1.0)
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}


def test_a_restarted_node_rejoins_under_its_id_everywhere() -> None:
    c = three(auto_dial=False, close_dead=True)  # the test dials, so each step is seen
    old_id, old_inc = c.id("c"), c.nodes["c"].core.incarnation
    old_record = MemberRecord(c.nodes["c"].core.local, old_inc, "alive")
    c.kill("c")
    c.run_for(3.0)
    assert all(c.nodes[n].core.status_of(old_id) == "dead" for n in "ab")
    t_restart = c.now
    node = c.restart("c")  # same key, so same id; one boot later
    assert node.node_id == old_id and node.core.incarnation > old_inc
    c.connect("c", "a")  # the join token names a only
    c.run_for(0.5)
    # b learnt of the new life from a's gossip: its newer incarnation supersedes the dead
    # record, so b dials it (the same life would not be news: see the test above)
    assert [e.info.node_id for t, e in c.events_of("b", PeerDiscovered) if t >= t_restart] == [
        old_id
    ]
    assert c.nodes["b"].core.status_of(old_id) == "known"
    c.connect("b", "c")
    c.run_for(1.0)
    for name in "abc":
        assert c.alive_view(name) == {"a", "b", "c"}
    for name in "ab":
        recs = {r.info.node_id: r for r in c.nodes[name].core.records()}
        assert recs[old_id].status == "alive" and recs[old_id].incarnation == node.core.incarnation
    # a straggling record of the old life changes nothing now
    c.inject("a", "b", Gossip((old_record,)))
    c.run_for(1.0)
    assert c.alive_view("b") == {"a", "b", "c"}
    assert not [e for t, e in c.events_of("b", PeerDied) if t >= t_restart]


def test_timer_schedule() -> None:
    a, b = make_info("a"), make_info("b")
    m = Membership(a, 100.0)
    assert m.get_timer() is None  # nobody to talk to, nobody to watch
    m.handle_connected(b, 100.0)
    m.pop_outgoing()
    assert m.get_timer() == pytest.approx(100.0 + T.heartbeat_interval)
    m.handle_timer(100.0 + T.heartbeat_interval)
    assert m.pop_outgoing() == [Outgoing(b.node_id, Heartbeat(0))]
    # a late call sends one heartbeat, not a burst of missed ones
    m.handle_heartbeat(b.node_id, Heartbeat(0), 100.3)
    m.handle_timer(100.3 + 3 * T.heartbeat_interval)
    hbs = [o for o in m.pop_outgoing() if isinstance(o.message, Heartbeat)]
    assert len(hbs) == 1
    timer = m.get_timer()
    assert timer is not None and timer > 100.3 + 3 * T.heartbeat_interval


def test_connected_node_id_is_checked() -> None:
    m = Membership(make_info("a"), 0.0)
    with pytest.raises(ValueError):
        m.handle_connected("not-a-node-id", 0.0)
    m.handle_connected(make_info("a").node_id, 0.0)  # ourselves: ignored
    assert m.pop_outgoing() == [] and drain(m) == []


def test_node_ids_are_derived_from_names() -> None:
    assert node_id_for("a") != node_id_for("b") and len(node_id_for("a")) == 16


def test_invented_nodes_cannot_grow_state_without_bound() -> None:
    a, b = make_info("a"), make_info("b")
    m = Membership(a, 0.0)
    m.handle_connected(b, 0.0)
    for batch in range(MAX_PEERS // 256 + 2):
        fake = tuple(
            MemberRecord(replace(b, node_id=f"{batch * 256 + i:016x}"), 0, "alive")
            for i in range(256)
        )
        m.handle_gossip(b.node_id, Gossip(fake), 0.1)
    assert len(m.known_peers()) < MAX_PEERS
    assert m.status_of(b.node_id) == "alive"


# ---------------------------------------------------------------------- random faults
NAMES = ("a", "b", "c", "d")
faults = st.lists(
    st.tuples(
        st.sampled_from(["kill", "pause", "disconnect", "partition", "leave"]),
        st.sampled_from(NAMES),
        st.sampled_from(NAMES),
        st.floats(0.05, 3.0),
    ),
    max_size=6,
)


@settings(max_examples=20, deadline=None)
@given(faults)
@example(ops=[("kill", "c", "a", 1.5), ("disconnect", "a", "b", 0.5), ("kill", "a", "a", 0.5)])
def test_survivors_agree_after_any_faults(ops: list[tuple[str, str, str, float]]) -> None:
    c = Cluster()
    for i, name in enumerate(NAMES):
        c.add(name, port=7000 + i)
    c.full_mesh()
    c.run_for(1.0)
    gone: set[str] = set()
    for op, x, y, t in ops:
        if x in gone or (op in ("disconnect", "partition") and (x == y or y in gone)):
            continue
        if op == "kill":
            c.kill(x)
            gone.add(x)
        elif op == "leave":
            c.leave(x)
            gone.add(x)
        elif op == "pause":
            c.pause(x, t)
        elif op == "disconnect":
            c.disconnect(x, y)
        else:
            c.partition(x, y)
        c.run_for(t)
    # the faults end; the nodes' dial loops reconnect whoever is still around
    for x, y in itertools.combinations(NAMES, 2):
        c.heal(x, y)
    c.run_for(3.5)  # any pause is over; dead and gone are detected
    for x, y in itertools.combinations(sorted(set(NAMES) - gone), 2):
        c.connect(x, y)
    # Hearsay can leave a gone node "known" (a dial candidate, never a member)
    # until forget_after passes without anyone mentioning it.
    c.run_for(2.0 + MembershipTimers().forget_after)
    survivors = set(NAMES) - gone
    for name in survivors:
        assert c.alive_view(name) == survivors, (name, ops)
        for other in gone:
            assert c.nodes[name].core.status_of(c.id(other)) in ("dead", "left")
