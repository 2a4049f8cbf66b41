"""Election of the host and the tensor-split plan: a pure function.

Public API:

- :class:`Candidate` -- an alive node as the election sees it;
- ``elect(candidates, model_bytes) -> Plan | WaitingForCapacity | NoEligibleHost``;
- :class:`Plan`, :class:`WaitingForCapacity`, :class:`NoEligibleHost` -- the
  outcomes, frozen dataclasses that compare equal when nothing changed (the
  host relaunches the engine only when the plan differs);
- ``order(plan) -> tuple[str, ...]`` -- the device order: workers, then host;
- ``required_bytes(model_bytes) -> int`` -- memory the mesh needs for a model.

Every node runs ``elect`` on its own view of the membership; the result
depends only on the set of candidates, never on their order, so nodes that
agree on who is alive agree on the plan.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "COMPUTE_RESERVE_BYTES",
    "Candidate",
    "ElectionResult",
    "NoEligibleHost",
    "Plan",
    "WaitingForCapacity",
    "elect",
    "order",
    "required_bytes",
]

# Weights are not the whole story: the KV cache and ggml's compute buffers
# grow with the context and live on the same devices. 15 % of the model on
# top of the weights plus a flat 256 MiB covers a default 4k-token context
# for the small and mid-size models this project targets; too little shows
# up as an allocation failure inside llama-server, after a slow load.
OVERHEAD_PERCENT = 15
COMPUTE_RESERVE_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    memory_bytes: int
    is_client: bool
    has_model: bool


@dataclass(frozen=True, slots=True)
class Plan:
    host_id: str
    workers: tuple[str, ...]  # memory descending, then node id
    tensor_split: tuple[float, ...]  # one per device: workers first, host last
    model_bytes: int


@dataclass(frozen=True, slots=True)
class WaitingForCapacity:
    reason: str
    needed_bytes: int
    available_bytes: int
    host_id: str | None  # who will host once there is enough memory


@dataclass(frozen=True, slots=True)
class NoEligibleHost:
    reason: str


ElectionResult = Plan | WaitingForCapacity | NoEligibleHost


def required_bytes(model_bytes: int) -> int:
    """Memory the mesh must offer in total to run a model of ``model_bytes``."""
    if model_bytes < 0:
        raise ValueError(f"model size {model_bytes} is negative")
    # Integer arithmetic, rounded up: every node must compute the same number.
    overhead = (model_bytes * OVERHEAD_PERCENT + 99) // 100
    return model_bytes + overhead + COMPUTE_RESERVE_BYTES


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def elect(candidates: Iterable[Candidate], model_bytes: int) -> ElectionResult:
    """Pick the host and split the layers over all eligible members.

    Clients and nodes offering no memory take no part. The host must hold
    the model file (llama-server loads it from disk); among those the one
    with the most memory wins, ties to the smaller node id. Every other
    eligible node is a worker.
    """
    needed = required_bytes(model_bytes)
    seen: set[str] = set()
    eligible: list[Candidate] = []
    for c in candidates:
        if c.node_id in seen:
            raise ValueError(f"candidate {c.node_id} appears twice")
        seen.add(c.node_id)
        if c.memory_bytes < 0:
            raise ValueError(f"candidate {c.node_id} offers negative memory")
        if not c.is_client and c.memory_bytes > 0:
            eligible.append(c)
    if not eligible:
        return NoEligibleHost("no member offers memory (only clients or zero-memory nodes)")
    eligible.sort(key=lambda c: (-c.memory_bytes, c.node_id))
    host = next((c for c in eligible if c.has_model), None)
    if host is None:
        return NoEligibleHost("no member with memory holds the model file")
    workers = [c for c in eligible if c is not host]
    total = sum(c.memory_bytes for c in eligible)
    if total < needed:
        return WaitingForCapacity(
            reason=(
                f"the model needs {_gib(needed)} (weights {_gib(model_bytes)} + KV cache and "
                f"compute buffers) but the mesh offers {_gib(total)}"
            ),
            needed_bytes=needed,
            available_bytes=total,
            host_id=host.node_id,
        )
    # The last device holds the output layer: the host goes last so the
    # logits (vocab × 4 B per token) never cross a tunnel.
    devices = [*workers, host]
    return Plan(
        host_id=host.node_id,
        workers=tuple(c.node_id for c in workers),
        tensor_split=tuple(round(c.memory_bytes / total, 3) for c in devices),
        model_bytes=model_bytes,
    )


def order(plan: Plan) -> tuple[str, ...]:
    """Node ids in device order, as ``tensor_split`` lists them: workers, then the host."""
    return (*plan.workers, plan.host_id)
