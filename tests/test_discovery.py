"""mDNS discovery, run inside a private network namespace so no packet leaves it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from mesh_inference.net.discovery import Discovery

async def main():
    found = []
    def make(node, mesh, port):
        return Discovery(node_id=node * 16, mesh_id=mesh * 16, quic_port=port,
                         addresses=["127.0.0.1"], interfaces=["127.0.0.1"],
                         on_found=lambda peer, addrs: found.append([node, peer, addrs]))
    nodes = [make("a", "1", 1111), make("b", "1", 2222), make("c", "2", 3333)]
    for n in nodes:
        await n.start()
    for _ in range(60):
        await asyncio.sleep(0.1)
        if {f[0] for f in found} >= {"a", "b"}:
            break
    await asyncio.sleep(0.3)
    for n in nodes:
        await n.close()
    print(json.dumps(found))

asyncio.run(main())
"""


def _can_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.mark.skipif(not _can_netns(), reason="needs root and iproute2 for a private netns")
def test_nodes_of_one_mesh_find_each_other(tmp_path: Path) -> None:
    ns = f"mi-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "multicast", "on"], check=True)
        subprocess.run(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "lo"], check=True)
        script = tmp_path / "disc.py"
        script.write_text(SCRIPT)
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(script), str(ROOT)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        import json

        found = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    pairs = {(me, peer[0]) for me, peer, _ in found}
    assert ("a", "b") in pairs and ("b", "a") in pairs
    # the node of another mesh is never reported, and nobody reports itself
    assert not any("c" in (me, peer) for me, peer in pairs)
    assert all(me != peer for me, peer in pairs)
    for _me, peer, addrs in found:
        assert addrs == [f"127.0.0.1:{1111 if peer[0] == 'a' else 2222}"]
