"""Three nodes on three "machines": private network namespaces joined by a bridge.

Each node has its own network stack and address (10.77.x.y, inside namespaces
this test creates and deletes), so nothing here can lean on a shared
127.0.0.1: the join token's routable address, QUIC between hosts, tunnels to
workers whose rpc-servers listen on their own loopback, and the API
answered from another machine's gateway.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_inference.cli.devmesh import LocalMesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[list[str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    bridge_ns = f"mibr-{tag}"
    names = [f"mi{i}-{tag}" for i in range(3)]
    created: list[str] = []
    try:
        for ns in (bridge_ns, *names):
            ip("netns", "add", ns)
            created.append(ns)
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge_ns, "link", "set", "br0", "up")
        subnet = 77 + int(tag[:2], 16) % 100  # a /24 private to this run's namespaces
        for i, ns in enumerate(names):
            ip("link", "add", f"v{i}{tag}", "netns", ns, "type", "veth",
               "peer", "name", f"b{i}{tag}", "netns", bridge_ns)
            ip("-n", bridge_ns, "link", "set", f"b{i}{tag}", "master", "br0")
            ip("-n", bridge_ns, "link", "set", f"b{i}{tag}", "up")
            ip("-n", ns, "addr", "add", f"10.{subnet}.0.{i + 1}/24", "dev", f"v{i}{tag}")
            ip("-n", ns, "link", "set", f"v{i}{tag}", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


def test_mesh_across_network_namespaces(hosts: list[str], tmp_path: Path) -> None:
    from mesh_inference.engine.backends import EngineUnavailable, find_backend

    try:
        find_backend("bin")
    except EngineUnavailable as exc:
        pytest.skip(f"llama.cpp binaries not installed: {exc}")
    lm = LocalMesh(tmp_path, extra_args=["--threads", "1"])
    try:
        a = lm.start_node("a", model="smollm2-135m", max_vram_gb=4, netns=hosts[0],
                          quic_host="0.0.0.0")
        token = lm.join_token(a)
        from mesh_inference.core.jointoken import JoinToken

        addrs = JoinToken.decode(token).addrs
        assert any(x.startswith("10.") for x in addrs), addrs  # the routable address
        b = lm.start_node("b", join=token, max_vram_gb=2, netns=hosts[1], quic_host="0.0.0.0")
        lm.start_node("c", join=token, max_vram_gb=1, netns=hosts[2], quic_host="0.0.0.0")
        st = lm.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 3,
                         timeout=300, what="3 namespaces serving")
        peers = {p["name"]: p for p in st["peers"]}
        assert peers["b"]["addrs"] and peers["b"]["rtt_ms"] is not None
        body = json.dumps({"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 16}).encode()
        # asked on machine b: its gateway forwards to the host on machine a over QUIC
        answer = json.loads(b.http_in_netns("POST", "/v1/chat/completions", body, 120))
        assert "Paris" in answer["choices"][0]["message"]["content"]
        tunnels = a.status()["tunnels"]
        # Every machine holds the GGUF: weights crossed as references, not bytes.
        assert len(tunnels) == 2
        assert all(0 < t["bytes_up"] < 5_000_000 and t["bytes_down"] > 0 for t in tunnels.values())
    finally:
        lm.stop()
