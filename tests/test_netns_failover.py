"""Failover on three "machines" (network namespaces): the CI-sized run of scripts/netns_suite.py.

Three real nodes with the real engine and SmolLM2, one network namespace each
on a bridge (as in test_netns_mesh.py): kill -9 a worker and restart it, kill
-9 the host and restart it, cut the host's bridge port and mend it. Each peer
must notice a death within a few seconds, a chat request sent at once through
a surviving node must answer 200 (it waits in the gateway instead of
failing), both sides of the partition must serve, and after the heal every
node must report one host and one plan.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import netns_suite

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

DETECT_S = 4.0  # design: suspect at 0.9 s, dead at 1.8 s; slack for a loaded CI machine
SERVE_S = 30.0  # --request-wait: a request that waits longer fails


def test_failover_across_namespaces(tmp_path: Path) -> None:
    reason = netns_suite.unavailable()
    if reason:
        pytest.skip(reason)
    from mesh_inference.engine.backends import EngineUnavailable, find_backend

    try:
        find_backend("bin")
    except EngineUnavailable as exc:
        pytest.skip(f"llama.cpp binaries not installed: {exc}")
    netns_suite.remove_stale_namespaces()
    with netns_suite.suite(3, tmp_path, partition_hold=6.0) as s:
        s.start()
        results = {r.scenario: r for r in s.run_all()}
        print("\n" + s.table())
        hosts = {s.view(m).get("host_id") for m in s.machines}
        plans = {tuple(s.view(m)["plan"]["order"]) for m in s.machines}
    assert not s.problems(), s.problems()
    assert len(results) == 6, list(results)
    for r in results.values():
        for peer, took in r.detection.items():
            assert took is not None and took < DETECT_S, (r.scenario, peer, took)
        for via, took in r.serving.items():
            assert took is not None and took < SERVE_S, (r.scenario, via, took)
    # After the heal: one host (a: the most memory) and one plan of all three, on every node.
    assert len(hosts) == 1 and len(plans) == 1, (hosts, plans)
    assert hosts == {s.machines[0].node_id} and len(next(iter(plans))) == 3
    assert all(m.node is None or m.node.proc.poll() is not None for m in s.machines)
    assert s.lab is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in (s.lab.bridge, *s.lab.hosts)), left
