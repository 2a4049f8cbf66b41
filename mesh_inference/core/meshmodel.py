"""Which model the mesh serves, who takes part, and each node's role: pure functions.

Public API::

    choose_model(members) -> ModelChoice | None     # the highest (epoch, ref) announced
    plan_for(members, choice, planner=None, left_out=()) -> PlanResult | None
                                                    # election + split for that model
    role_in(plan, node_id, client=False) -> Role

The mesh model travels in every node's ``NodeInfo`` as ``(model,
model_epoch)``: the highest pair among the alive members wins everywhere,
so a model switch survives the node that made it, and a node started with
``--model`` (epoch 0) never overrides a switch (epoch ≥ 1). Only members
whose own rpc-server is ready take part in a plan (a worker without one
would make llama-server abort), and only nodes holding the chosen model's
file may host it. A member takes part only once its record answers for
the chosen model, i.e. announces that very ``(epoch, ref)``: before it has
adopted it (a node that just joined announces no model, or the one it was
started with) its ``has_model`` says nothing about this model's file, and
planning it as a worker without the file, only to drop it when it turns out
to hold one, costs the host two engine relaunches. A node holding the file
takes part once it has indexed it (announced its sha256): then the host can
send it weight references instead of weight bytes from the first launch,
instead of loading over the wire and relaunching. So a joining node enters
the plan once, in its final role. All of this is a function of the members'
records, so every node computes the same plan from the same view -- except the workers
the host holds in quarantine (``left_out``, core/quarantine.py), which only
the host's own plan leaves out; the elected host is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from mesh_inference.core.messages import NodeInfo
from mesh_inference.core.plan import Candidate, NoEligibleHost, Plan, WaitingForCapacity, elect

PlanResult = Plan | WaitingForCapacity | NoEligibleHost
Role = Literal["host", "worker", "standby", "client"]


@dataclass(frozen=True, order=True)
class ModelChoice:
    epoch: int
    ref: str


def choose_model(members: Iterable[NodeInfo]) -> ModelChoice | None:
    """The model the mesh serves: the highest ``(epoch, ref)`` any alive member announces."""
    return max((ModelChoice(m.model_epoch, m.model) for m in members if m.model), default=None)


def _follows(member: NodeInfo, choice: ModelChoice) -> bool:
    """``member``'s record speaks of ``choice``: its ``has_model``/sha256 are about that file."""
    return (member.model_epoch, member.model) == (choice.epoch, choice.ref)


def _holds(member: NodeInfo, choice: ModelChoice) -> bool:
    return member.has_model and _follows(member, choice)


def _takes_part(member: NodeInfo, choice: ModelChoice) -> bool:
    """Whether ``member`` is a candidate in the plan for ``choice``.

    Clients always are (the election skips them). A member needs a ready
    rpc-server (else llama-server aborts), must have reported on this model
    (adopted it: until then whether it holds the file is unknown), and, if it
    holds the file, must have indexed it (announced the sha256), so it enters
    the plan once, as the holder it is, and not first as a worker without it.
    """
    if member.role == "client":
        return True
    if not member.rpc_ready or not _follows(member, choice):
        return False
    return not member.has_model or member.model_sha256 is not None


def plan_for(
    members: Iterable[NodeInfo],
    choice: ModelChoice | None,
    *,
    planner: str | None = None,
    left_out: Collection[str] = (),
) -> PlanResult | None:
    """Election and tensor split for ``choice`` among ``members`` (None: no model yet).

    ``left_out`` (the peers ``planner`` holds in quarantine, core/quarantine.py)
    applies only when ``planner`` is the elected host: the host makes the split,
    so it alone leaves them out of its workers. The election itself never looks
    at ``left_out``, so every node still elects the same host.
    """
    if choice is None:
        return None
    members = list(members)
    model_bytes = max((m.model_bytes for m in members if _holds(m, choice)), default=0)
    candidates = [
        Candidate(m.node_id, m.memory_bytes, m.role == "client", _holds(m, choice))
        for m in members
        if _takes_part(m, choice)
    ]
    result = elect(candidates, model_bytes)
    host = host_of(result)
    if planner is None or host != planner or not left_out:
        return result
    kept = [c for c in candidates if c.node_id == host or c.node_id not in left_out]
    return result if len(kept) == len(candidates) else elect(kept, model_bytes)


def host_of(plan: PlanResult | None) -> str | None:
    """The node that runs (or is to run) llama-server under ``plan``."""
    if isinstance(plan, Plan | WaitingForCapacity):
        return plan.host_id
    return None


def role_in(plan: PlanResult | None, node_id: str, client: bool = False) -> Role:
    if client:
        return "client"
    if host_of(plan) == node_id:
        return "host"
    if isinstance(plan, Plan) and node_id in plan.workers:
        return "worker"
    return "standby"
