"""The status document (``GET /api/status``, SSE ``status`` events, ``mesh-inference status``).

Public API::

    build_status(StatusInputs(...)) -> dict    # JSON-ready

A pure function of what the node's parts report, so the shape of the
document is tested without a node. The join token is included here; the
HTTP layer removes it for callers that did not prove console access.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh_inference import __version__
from mesh_inference.core.membership import Membership
from mesh_inference.core.meshmodel import PlanResult, host_of, role_in
from mesh_inference.core.plan import NoEligibleHost, Plan, WaitingForCapacity


@dataclass(frozen=True)
class StatusInputs:
    node_id: str
    client: bool
    http_url: str
    mesh_id: str | None
    join_token: str | None
    membership: Membership
    now: float
    plan: PlanResult | None
    rtt: Callable[[str], float | None]
    rpc_state: str
    engine_state: str  # this node's llama-server
    engine_detail: str
    engine_startup_s: float | None
    backend: str | None
    backend_error: str | None
    model: dict[str, Any]
    tunnels: dict[str, dict[str, int]]
    # This node's copy of the model file from a peer (models/transfer.py): ref, state,
    # from, bytes, total, error; None when it fetches nothing.
    model_fetch: dict[str, Any] | None = None
    # Peers this node holds in quarantine (core/quarantine.py): id -> {"reason", "until"
    # (Unix time)}; only the host's own quarantine shapes the plan.
    quarantine: dict[str, dict[str, Any]] = field(default_factory=dict)


def _plan_json(plan: PlanResult | None) -> tuple[dict[str, Any], dict[str, float]]:
    if isinstance(plan, Plan):
        order = [*plan.workers, plan.host_id]
        shares = dict(zip(order, plan.tensor_split, strict=True))
        return {
            "state": "planned",
            "host_id": plan.host_id,
            "order": order,
            "tensor_split": list(plan.tensor_split),
            "reason": None,
        }, shares
    base: dict[str, Any] = {
        "state": "none",
        "host_id": None,
        "order": [],
        "tensor_split": [],
        "reason": "no model announced",
    }
    if isinstance(plan, WaitingForCapacity):
        base.update(
            state="waiting",
            host_id=plan.host_id,
            reason=plan.reason,
            needed_bytes=plan.needed_bytes,
            available_bytes=plan.available_bytes,
        )
    elif isinstance(plan, NoEligibleHost):
        base["reason"] = plan.reason
    return base, {}


def build_status(s: StatusInputs) -> dict[str, Any]:
    plan_json, shares = _plan_json(s.plan)
    host = host_of(s.plan)
    peers = []
    host_engine = s.engine_state
    for rec in s.membership.records():
        info = rec.info
        if info.node_id == s.node_id:
            continue
        if info.node_id == host:
            host_engine = info.engine_state
        last = s.membership.last_heard(info.node_id)
        rtt = s.rtt(info.node_id)
        peers.append(
            {
                "id": info.node_id,
                "name": info.name,
                "role": role_in(s.plan, info.node_id, info.role == "client"),
                "status": rec.status,
                "memory_bytes": info.memory_bytes,
                "addrs": list(info.addrs),
                "last_seen_s": None if last is None else round(s.now - last, 3),
                "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
                "share": shares.get(info.node_id),
                "engine_state": info.engine_state,
                "has_model": info.has_model,
                "model_sha256": info.model_sha256,
                "quarantine": s.quarantine.get(info.node_id),
            }
        )
    if host is not None and host != s.node_id and not any(p["id"] == host for p in peers):
        host_engine = "unknown"
    me = s.membership.local
    return {
        "node": {
            "id": s.node_id,
            "name": me.name,
            "role": role_in(s.plan, s.node_id, s.client),
            "memory_bytes": me.memory_bytes,
            "addrs": list(me.addrs),
            "http_url": s.http_url,
            "share": shares.get(s.node_id),
            "rpc_state": s.rpc_state,
        },
        "mesh_id": s.mesh_id,
        "host_id": host,
        "model": s.model,
        "peers": peers,
        "plan": plan_json,
        "engine": {
            "state": host_engine,
            "backend": s.backend,
            "detail": s.engine_detail if host == s.node_id else "",
            # spawn → healthy of this host's llama-server: its model load time
            "startup_s": s.engine_startup_s if host == s.node_id else None,
            "error": s.backend_error,
        },
        "ready": host_engine == "ready",
        "tunnels": s.tunnels,
        "model_fetch": s.model_fetch,
        "join_token": s.join_token,
        "version": __version__,
        "time": time.time(),
    }
