"""scripts/demo.py outlives a node: it reports the death, the mesh re-forms and keeps
serving, and ``r`` + Enter brings the node back under the same id.

The demo runs as a real process in its own process group, with its state in a
temporary directory and any free port; the test kills one node by the pid the
demo printed and stops the demo by its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
NODE_LINE = re.compile(r"^\s+(node-\w)\s+id ([0-9a-f]{16})\s+pid (\d+)\s+(\w+)\s+(http://\S+)")


class DemoProcess:
    def __init__(self, state: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(DEMO), "--state-dir", str(state), "--port", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        self.lines: list[str] = []
        self.pids: list[int] = []  # every node pid the demo printed
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._q.put(raw.decode(errors="replace").rstrip("\n"))
        self._q.put(None)

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """The next output line matching ``pattern`` (earlier lines are kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} in:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"demo ended before {pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stop(self) -> None:
        """SIGTERM to the demo's process group: the demo stops its nodes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def chat(url: str) -> int:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.loads(resp.read())["choices"][0]["message"]["content"]
        return resp.status


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[DemoProcess]:
    from mesh_inference.engine.backends import EngineUnavailable, find_backend

    try:
        find_backend("bin")
    except EngineUnavailable as exc:
        pytest.skip(f"llama.cpp binaries not installed: {exc}")
    d = DemoProcess(tmp_path / "demo")
    try:
        yield d
    finally:
        d.stop()
        for pid in d.pids:  # nodes are in their own groups: the demo must have stopped them
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                pytest.fail(f"node pid {pid} outlived the demo")


def test_demo_survives_a_dead_node_and_restarts_it(demo: DemoProcess) -> None:
    demo.expect(r"^ready in", timeout=300)
    nodes = {}
    for _ in range(3):
        m = demo.expect(NODE_LINE.pattern, timeout=10)
        nodes[m[1]] = {"id": m[2], "pid": int(m[3]), "role": m[4], "url": m[5]}
    demo.pids.extend(n["pid"] for n in nodes.values())
    assert nodes["node-a"]["role"] == "host"
    demo.expect(r"r \+ Enter restarts", timeout=10)

    victim = nodes["node-c"]
    os.kill(victim["pid"], signal.SIGKILL)  # its sidecar; its engine follows (PDEATHSIG)
    died = demo.expect(r"^node (node-\w) died \(pid (\d+), signal 9\)", timeout=30)
    assert died[1] == "node-c" and int(died[2]) == victim["pid"]
    demo.expect(r"^mesh re-formed without node-c in [\d.]+ s: 2 nodes, host node-a", timeout=90)
    demo.expect(r"^press r \+ Enter to restart node-c", timeout=5)
    assert demo.proc.poll() is None
    assert chat(nodes["node-b"]["url"]) == 200  # a worker's gateway: through the host

    demo.send("r\n")
    back = demo.expect(r"^node-c is back: pid (\d+), (same|NEW) node id ([0-9a-f]{16})", 90)
    demo.pids.append(int(back[1]))
    assert back[2] == "same" and back[3] == victim["id"]
    demo.expect(r"^node-c rejoined: mesh re-formed in [\d.]+ s: 3 nodes, host node-a", 120)
    assert chat(nodes["node-a"]["url"]) == 200

    demo.stop()
    assert demo.proc.returncode == 0, "\n".join(demo.lines)
