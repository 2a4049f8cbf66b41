"""Which model the mesh serves, the plan for it and each node's role (pure functions)."""

from __future__ import annotations

from dataclasses import replace

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
    # b holds the file of the model the mesh switched away from: it is only a worker.
    members = [info("a", 1, has_model=True, model_epoch=1), info("b", 8, has_model=True)]
    plan = plan_for(members, choose_model(members))
    assert isinstance(plan, Plan) and plan.host_id == "a"


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
