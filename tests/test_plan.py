"""Election and tensor-split plan (a pure function)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_inference.core.plan import (
    COMPUTE_RESERVE_BYTES,
    Candidate,
    NoEligibleHost,
    Plan,
    WaitingForCapacity,
    elect,
    order,
    required_bytes,
)

GiB = 1 << 30
MODEL = 100 << 20  # a SmolLM2-sized model: 100 MiB


def cand(n: int, mem_gib: float, *, client: bool = False, model: bool = False) -> Candidate:
    return Candidate(f"{n:016x}", int(mem_gib * GiB), client, model)


def test_host_is_the_biggest_model_holder_and_goes_last() -> None:
    cs = [cand(1, 2), cand(2, 8, model=True), cand(3, 4), cand(4, 6, model=True)]
    plan = elect(cs, MODEL)
    assert isinstance(plan, Plan)
    assert plan.host_id == cand(2, 0).node_id
    # workers by memory, descending; the host last in the device order
    assert plan.workers == (cand(4, 0).node_id, cand(3, 0).node_id, cand(1, 0).node_id)
    assert order(plan) == (*plan.workers, plan.host_id)
    assert plan.tensor_split == (0.3, 0.2, 0.1, 0.4)
    assert plan.model_bytes == MODEL


def test_a_bigger_node_without_the_model_is_a_worker() -> None:
    plan = elect([cand(1, 16), cand(2, 1, model=True)], MODEL)
    assert isinstance(plan, Plan)
    assert plan.host_id == cand(2, 0).node_id
    assert plan.workers == (cand(1, 0).node_id,)
    assert plan.tensor_split == (round(16 / 17, 3), round(1 / 17, 3))


def test_ties_go_to_the_smaller_node_id() -> None:
    cs = [cand(9, 4, model=True), cand(3, 4, model=True), cand(5, 4), cand(4, 4)]
    plan = elect(cs, MODEL)
    assert isinstance(plan, Plan)
    assert plan.host_id == cand(3, 0).node_id
    assert plan.workers == (cand(4, 0).node_id, cand(5, 0).node_id, cand(9, 0).node_id)
    assert plan.tensor_split == (0.25, 0.25, 0.25, 0.25)


def test_input_order_does_not_matter() -> None:
    cs = [cand(i, 1 + (i * 7) % 5, model=i % 3 == 0) for i in range(1, 12)]
    first = elect(cs, MODEL)
    rng = random.Random(42)
    for _ in range(50):
        shuffled = cs[:]
        rng.shuffle(shuffled)
        assert elect(shuffled, MODEL) == first
        assert elect(iter(shuffled), MODEL) == first  # any iterable


def test_single_node_plan() -> None:
    plan = elect([cand(1, 4, model=True)], MODEL)
    assert plan == Plan(cand(1, 0).node_id, (), (1.0,), MODEL)
    assert order(plan) == (cand(1, 0).node_id,)


def test_clients_and_zero_memory_nodes_take_no_part() -> None:
    cs = [cand(1, 64, client=True, model=True), cand(2, 0, model=True), cand(3, 2, model=True),
          cand(4, 2)]
    plan = elect(cs, MODEL)
    assert isinstance(plan, Plan)
    assert plan.host_id == cand(3, 0).node_id
    assert plan.workers == (cand(4, 0).node_id,)


def test_nobody_holds_the_model() -> None:
    result = elect([cand(1, 8), cand(2, 4), cand(3, 4, client=True, model=True)], MODEL)
    assert isinstance(result, NoEligibleHost)
    assert "model" in result.reason


@pytest.mark.parametrize(
    "cs", [[], [cand(1, 4, client=True, model=True)], [cand(1, 0, model=True)]]
)
def test_nobody_offers_memory(cs: list[Candidate]) -> None:
    result = elect(cs, MODEL)
    assert isinstance(result, NoEligibleHost)
    assert "memory" in result.reason


def test_waiting_for_capacity() -> None:
    model = 10 * GiB
    cs = [cand(1, 4, model=True), cand(2, 3)]
    result = elect(cs, model)
    assert isinstance(result, WaitingForCapacity)
    assert result.needed_bytes == required_bytes(model)
    assert result.available_bytes == 7 * GiB
    assert result.host_id == cand(1, 0).node_id  # who will host once it fits
    assert "11.75 GiB" in result.reason and "7.00 GiB" in result.reason
    # one more node and it fits
    plan = elect([*cs, cand(3, 8)], model)
    assert isinstance(plan, Plan) and plan.host_id == cand(1, 0).node_id


def test_exactly_enough_memory_is_enough() -> None:
    need = required_bytes(MODEL)
    plan = elect([Candidate("00000000000000aa", need, False, True)], MODEL)
    assert isinstance(plan, Plan)
    result = elect([Candidate("00000000000000aa", need - 1, False, True)], MODEL)
    assert isinstance(result, WaitingForCapacity)


def test_required_bytes() -> None:
    assert required_bytes(0) == COMPUTE_RESERVE_BYTES == 256 << 20
    assert required_bytes(100) == 100 + 15 + (256 << 20)
    assert required_bytes(101) == 101 + 16 + (256 << 20)  # rounded up
    assert required_bytes(10 * GiB) == int(10 * GiB * 1.15) + (256 << 20)
    with pytest.raises(ValueError):
        required_bytes(-1)


def test_invalid_candidates_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        elect([cand(1, 4, model=True), cand(1, 2)], MODEL)
    with pytest.raises(ValueError, match="negative"):
        elect([Candidate("0000000000000001", -5, False, True)], MODEL)


def test_plans_compare_equal_when_nothing_changed() -> None:
    cs = [cand(1, 4, model=True), cand(2, 4)]
    assert elect(cs, MODEL) == elect(list(reversed(cs)), MODEL)
    assert elect(cs, MODEL) != elect([*cs, cand(3, 1)], MODEL)
    assert hash(elect(cs, MODEL)) == hash(elect(cs, MODEL))


# ---------------------------------------------------------------------- properties
candidates = st.lists(
    st.builds(
        Candidate,
        node_id=st.integers(0, 40).map(lambda i: f"{i:016x}"),
        # 0 and repeated sizes exercise exclusion and tie-breaking
        memory_bytes=st.just(0) | st.integers(1, 64 * GiB) | st.sampled_from([GiB, 2 * GiB]),
        is_client=st.booleans(),
        has_model=st.booleans(),
    ),
    max_size=12,
    unique_by=lambda c: c.node_id,
)


@given(candidates, st.integers(0, 64 * GiB), st.randoms(use_true_random=False))
def test_election_properties(cs: list[Candidate], model: int, rng: random.Random) -> None:
    result = elect(cs, model)
    shuffled = cs[:]
    rng.shuffle(shuffled)
    assert elect(shuffled, model) == result

    eligible = [c for c in cs if not c.is_client and c.memory_bytes > 0]
    hosts = [c for c in eligible if c.has_model]
    total = sum(c.memory_bytes for c in eligible)
    if not hosts:
        assert isinstance(result, NoEligibleHost)
        return
    best = min(hosts, key=lambda c: (-c.memory_bytes, c.node_id))
    if total < required_bytes(model):
        assert isinstance(result, WaitingForCapacity)
        assert (result.needed_bytes, result.available_bytes, result.host_id) == (
            required_bytes(model), total, best.node_id)
        return
    assert isinstance(result, Plan)
    assert result.host_id == best.node_id
    by_id = {c.node_id: c for c in eligible}
    # every eligible node exactly once, host last, workers by memory then id
    assert sorted(order(result)) == sorted(by_id)
    assert order(result)[-1] == result.host_id
    keys = [(-by_id[w].memory_bytes, w) for w in result.workers]
    assert keys == sorted(keys)
    assert len(result.tensor_split) == len(result.workers) + 1
    assert all(0.0 <= s <= 1.0 for s in result.tensor_split)
    assert sum(result.tensor_split) == pytest.approx(1.0, abs=0.0005 * len(result.tensor_split))
    for node_id, share in zip(order(result), result.tensor_split, strict=True):
        assert share == round(by_id[node_id].memory_bytes / total, 3)
