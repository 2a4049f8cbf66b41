"""Quarantine through real nodes: a worker whose rpc-server keeps dying is left out, then back.

Two in-process nodes (real QUIC, real gateways, the stand-in engine processes
of tests/standin_engine.py, as in test_node_inprocess.py). The test kills the
worker's own rpc-server child (by the pid its supervisor started) again and
again; the host sees the worker drop out of its plan each time, counts the
failures (core/quarantine.py), and after the third leaves it out of its plan
while it is healthy again, until the back-off has passed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from ggufs import tiny_gguf
from test_node_inprocess import make_node, peer_entry, ready_with, until

from mesh_inference.core.quarantine import QuarantinePolicy
from mesh_inference.node import Node

pytestmark = pytest.mark.timeout(120)

# Three failures within a minute: out for 3 s (long enough to look at, no wall-clock
# assertion rests on it). Reports 0.2 s apart are separate incidents.
POLICY = QuarantinePolicy(threshold=3, window=60, base=3, cap=60, healthy_after=600,
                          incident_gap=0.2)  # fmt: skip


def plan_order(node: Node) -> list[str]:
    order: list[str] = node.status()["plan"]["order"]
    return order


def kill_rpc_server(node: Node) -> int:
    """SIGKILL the rpc-server child this node's supervisor started (by its pid)."""
    assert node._worker is not None and node._worker._supervisor is not None
    pid = node._worker._supervisor.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


async def test_a_worker_whose_rpc_server_keeps_dying_is_quarantined_then_readmitted(
    tmp_path: Path,
) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    a = make_node(tmp_path, "a", 4, model_ref=str(model), quarantine=POLICY)
    await a.start()
    b = make_node(tmp_path, "b", 2, join=a.join_token)
    try:
        await b.start()
        await until(lambda: ready_with(a, 2), "a hosts over a and b")
        for strike in (1, 2):
            kill_rpc_server(b)
            await until(lambda: b.node_id not in plan_order(a), f"b out after death {strike}")
            # its rpc-server is restarted by b's supervisor: one failure is not a quarantine
            await until(lambda: ready_with(a, 2), f"b planned in again after death {strike}")
            assert peer_entry(a, b.node_id)["quarantine"] is None
            assert a._quarantine.failures(b.node_id) == strike
        kill_rpc_server(b)
        # b comes back (its rpc-server is ready and announced), but the host keeps it out
        await until(
            lambda: b._worker is not None and b._worker.ready
            and peer_entry(a, b.node_id)["status"] == "alive"
            and peer_entry(a, b.node_id)["quarantine"] is not None and ready_with(a, 1),
            "b quarantined: healthy again, still out of a's plan",
        )  # fmt: skip
        q = peer_entry(a, b.node_id)["quarantine"]
        st = a.status()
        assert "rpc-server went down" in q["reason"]
        assert q["until"] > st["time"] - 1  # wall-clock time, for the console
        assert st["plan"]["order"] == [a.node_id]
        assert peer_entry(a, b.node_id)["role"] == "standby"
        # Only the host leaves it out (DESIGN.md): the election is the same everywhere.
        assert b.status()["host_id"] == a.node_id
        # After the back-off the host plans b in again, and relaunches over both.
        await until(
            lambda: ready_with(a, 2) and peer_entry(a, b.node_id)["quarantine"] is None,
            "b readmitted after its quarantine", within=30,
        )  # fmt: skip
        assert plan_order(a) == [b.node_id, a.node_id]
    finally:
        await b.stop()
        await a.stop()
