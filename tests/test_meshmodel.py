"""Which model the mesh serves, the plan for it and each node's role (pure functions)."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from mesh_inference.core.meshmodel import ModelChoice, choose_model, host_of, plan_for, role_in
from mesh_inference.core.messages import NodeInfo
from mesh_inference.core.plan import NoEligibleHost, Plan, WaitingForCapacity

GIB = 1 << 30


def info(node_id: str, gib: float, **over: object) -> NodeInfo:
    base = NodeInfo(
        node_id=node_id, name=node_id, role="member", memory_bytes=int(gib * GIB), addrs=(),
        http_port=1, model="m", has_model=False, version="0", model_bytes=GIB // 10,
        rpc_ready=True, model_epoch=0, model_sha256="ab" * 32,
    )  # fmt: skip
    return replace(base, **over)  # type: ignore[arg-type]


def test_the_highest_epoch_wins_then_the_ref() -> None:
    members = [info("a", 1, model="x", model_epoch=0), info("b", 1, model="y", model_epoch=2),
               info("c", 1, model="z", model_epoch=2), info("d", 1, model=None)]  # fmt: skip
    assert choose_model(members) == ModelChoice(2, "z")
    assert choose_model([info("d", 1, model=None)]) is None


def test_plan_puts_the_biggest_holder_last_and_skips_unready_workers() -> None:
    members = [
        info("a", 4, has_model=True),
        info("b", 2),
        info("c", 8, rpc_ready=False),  # no rpc-server yet: llama-server would abort on it
        info("d", 0, role="client"),
    ]
    plan = plan_for(members, ModelChoice(0, "m"))
    assert isinstance(plan, Plan)
    assert (plan.host_id, plan.workers) == ("a", ("b",))
    assert role_in(plan, "a") == "host" and role_in(plan, "b") == "worker"
    assert role_in(plan, "c") == "standby" and role_in(plan, "d", client=True) == "client"


def test_a_holder_of_another_epoch_cannot_host() -> None:
    # b holds the file of the model the mesh switched away from: it cannot host, and
    # until it has adopted the new epoch it says nothing about that file: not planned.
    members = [info("a", 1, has_model=True, model_epoch=1), info("b", 8, has_model=True)]
    plan = plan_for(members, choose_model(members))
    assert isinstance(plan, Plan) and (plan.host_id, plan.workers) == ("a", ())


def test_a_holder_takes_part_once_it_has_indexed_the_file() -> None:
    choice = ModelChoice(0, "m")
    members = [info("a", 4, has_model=True), info("b", 8, has_model=True, model_sha256=None),
               info("c", 2, model_sha256=None)]  # fmt: skip
    plan = plan_for(members, choice)
    # b still hashes its copy: left out for now; c has no copy and needs no index.
    assert isinstance(plan, Plan) and (plan.host_id, plan.workers) == ("a", ("c",))
    members[1] = replace(members[1], model_sha256="cd" * 32)
    plan = plan_for(members, choice)
    assert isinstance(plan, Plan) and (plan.host_id, plan.workers) == ("b", ("a", "c"))


def test_a_member_is_planned_only_once_it_reports_on_the_mesh_model() -> None:
    choice = ModelChoice(1, "m")
    host = info("a", 4, has_model=True, model_epoch=1)
    # What a node that just joined announces before it adopted the mesh model: no model,
    # so no word on the file (it may well hold it); or the model it was started with.
    for unreported in (
        info("b", 2, model=None, model_sha256=None),
        info("b", 2, model="m", model_epoch=0, has_model=False, model_sha256=None),
        info("b", 2, model="other", model_epoch=1, has_model=True),
    ):
        plan = plan_for([host, unreported], choice)
        assert isinstance(plan, Plan) and plan.workers == (), unreported
    # Once it follows the mesh model, its record decides: without the file it is a
    # worker at once; with it, once indexed.
    absent = info("b", 2, model_epoch=1, has_model=False, model_sha256=None)
    indexing = replace(absent, has_model=True)
    indexed = replace(indexing, model_sha256="cd" * 32)
    assert [_workers(plan_for([host, b], choice)) for b in (absent, indexing, indexed)] == [
        ("b",), (), ("b",)
    ]
    # Clients take no part in the split whatever they announce.
    client = info("c", 8, role="client", model=None, rpc_ready=False)
    assert plan_for([host, client], choice) == plan_for([host], choice)


def _workers(plan: object) -> tuple[str, ...]:
    assert isinstance(plan, Plan)
    return plan.workers


def _lifecycle(joiner: NodeInfo, holds: bool) -> list[NodeInfo]:
    """What a joining node announces, in order: gossip of its first contact, then its
    adoption of the mesh model (with the file: indexing, then indexed; or without it)."""
    first = replace(joiner, model=None, model_epoch=0, has_model=False, model_sha256=None)
    adopted = replace(joiner, has_model=holds, model_sha256=None)
    if not holds:
        return [first, adopted]
    return [first, adopted, replace(adopted, model_sha256="cd" * 32)]


def test_a_joining_holder_enters_the_plan_once_as_the_holder_it_is() -> None:
    """The flap this rule removes: before, the joiner was planned as a worker without
    the file (first contact), dropped while it indexed its copy, then planned again."""
    choice = ModelChoice(0, "m")
    mesh = [info("a", 4, has_model=True), info("b", 2)]
    plans = [plan_for([*mesh, c], choice) for c in _lifecycle(info("c", 1), holds=True)]
    assert [_workers(p) for p in plans] == [("b",), ("b",), ("b", "c")]
    plans = [plan_for([*mesh, c], choice) for c in _lifecycle(info("c", 1), holds=False)]
    assert [_workers(p) for p in plans] == [("b",), ("b", "c")]


def test_no_model_no_plan_and_no_holder_no_host() -> None:
    assert plan_for([info("a", 4)], None) is None
    result = plan_for([info("a", 4)], ModelChoice(0, "m"))
    assert isinstance(result, NoEligibleHost) and host_of(result) is None
    small = plan_for([info("a", 0.01, has_model=True)], ModelChoice(0, "m"))
    assert isinstance(small, WaitingForCapacity) and host_of(small) == "a"
    assert role_in(small, "a") == "host"


ids = st.lists(st.from_regex(r"[0-9a-f]{4}", fullmatch=True), min_size=1, max_size=6, unique=True)


@given(ids, st.data())
def test_every_node_computes_the_same_plan_from_the_same_members(
    node_ids: list[str], data: st.DataObject
) -> None:
    members = [
        info(n, data.draw(st.integers(0, 16)), has_model=data.draw(st.booleans()))
        for n in node_ids
    ]
    shuffled = data.draw(st.permutations(members))
    choice = choose_model(members)
    assert choose_model(shuffled) == choice
    assert plan_for(members, choice) == plan_for(shuffled, choice)


def test_the_host_leaves_its_quarantined_workers_out_and_everyone_keeps_the_host() -> None:
    choice = ModelChoice(0, "m")
    members = [info("a", 4, has_model=True), info("b", 2), info("c", 1),
               info("d", 8, has_model=True, model_sha256=None)]  # fmt: skip
    full = plan_for(members, choice)
    assert isinstance(full, Plan) and (full.host_id, full.workers) == ("a", ("b", "c"))
    # the host a quarantines b: its plan splits over c and itself only
    mine = plan_for(members, choice, planner="a", left_out={"b"})
    assert isinstance(mine, Plan) and (mine.host_id, mine.workers) == ("a", ("c",))
    assert mine.tensor_split == (0.2, 0.8)
    # any other node's quarantine changes nothing: only the host makes the split
    assert plan_for(members, choice, planner="c", left_out={"b"}) == full
    # the host is never left out, so the election stays the same everywhere
    assert plan_for(members, choice, planner="a", left_out={"a", "b", "c"}) == Plan(
        "a", (), (1.0,), GIB // 10
    )


def test_leaving_out_workers_can_leave_the_host_short_of_memory() -> None:
    choice = ModelChoice(0, "m")
    members = [info("a", 0.2, has_model=True), info("b", 2)]
    result = plan_for(members, choice, planner="a", left_out=["b"])
    assert isinstance(result, WaitingForCapacity) and result.host_id == "a"


@given(ids, st.data())
def test_quarantine_never_changes_the_elected_host(
    node_ids: list[str], data: st.DataObject
) -> None:
    members = [
        info(n, data.draw(st.integers(0, 16)), has_model=data.draw(st.booleans()))
        for n in node_ids
    ]
    choice = choose_model(members)
    planner = data.draw(st.sampled_from(node_ids))
    left_out = data.draw(st.sets(st.sampled_from(node_ids)))
    mine = plan_for(members, choice, planner=planner, left_out=left_out)
    full = plan_for(members, choice)
    assert host_of(mine) == host_of(full)
    if host_of(full) != planner:
        assert mine == full
    elif isinstance(mine, Plan):
        assert not set(mine.workers) & left_out


@given(ids, st.data())
def test_a_joiner_changes_the_plan_at_most_once(node_ids: list[str], data: st.DataObject) -> None:
    *others, joiner_id = node_ids
    members = [
        info(n, data.draw(st.integers(0, 16)), has_model=data.draw(st.booleans()))
        for n in others
    ]
    joiner = info(joiner_id, data.draw(st.integers(0, 16)))
    holds = data.draw(st.booleans())
    choice = ModelChoice(0, "m")
    plans = [plan_for([*members, j], choice) for j in _lifecycle(joiner, holds)]
    changes = sum(1 for before, after in pairwise(plans) if before != after)
    assert changes <= 1
    assert plans[0] == plan_for(members, choice)  # first contact: as if it were not there
