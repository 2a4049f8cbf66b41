"""Leaving the mesh, with real node processes: SIGTERM is graceful, SIGKILL leaves no orphan.

Real CLI nodes (``python -m mesh_inference``, started by devmesh.LocalMesh)
whose engine is the stand-in of tests/standin_engine.py, reached through
``--llama-bin``: a directory holding ``llama-server`` and ``rpc-server``
scripts that exec it with llama.cpp's own flags. So the sidecar starts its
engine children exactly as it starts llama.cpp (supervisor, own sessions,
PR_SET_PDEATHSIG), and the children start in milliseconds.

SIGKILL of a sidecar: its engine children die with it; a killed member stays
dead at its peers, and restarted with the same state dir it rejoins under
the same node id. SIGTERM: the request in flight completes, new ones get a
503, the peer sees a Goodbye (``left``, not ``dead``), the engines stop.

Only processes these tests started are signalled, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from ggufs import tiny_gguf

from mesh_inference.cli.devmesh import LocalMesh, NodeProcess

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"),
]

STANDIN = Path(__file__).with_name("standin_engine.py")
# Safety nets so a broken leave fails the test instead of hanging it; not assertions on speed.
WAIT_S = 30.0
TOKENS = 60


def standin_bin(d: Path) -> Path:
    d.mkdir()
    for name in ("llama-server", "rpc-server"):
        script = d / name
        script.write_text(
            f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))} "
            f'{name} "$@"\n'
        )
        script.chmod(0o755)
    return d


@dataclass
class Mesh(LocalMesh):
    # Engine children seen during a test: killed by these pids if a test leaves any.
    engine_children: list[psutil.Process] = field(default_factory=list)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    lm = Mesh(
        tmp_path / "mesh",
        extra_args=["--llama-bin", str(standin_bin(tmp_path / "bin")), "--threads", "1",
                    "--models-dir", str(tmp_path / "models")],
        # 60 streamed tokens take 3 s: a request that is surely in flight at SIGTERM
        extra_env={"STANDIN_TOKEN_DELAY_S": "0.05"},
    )  # fmt: skip
    try:
        yield lm
    finally:
        lm.stop()
        for proc in lm.engine_children:  # only if a test failed: by their pids, never by name
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def engine_children(lm: Mesh, node: NodeProcess) -> list[psutil.Process]:
    """The sidecar's stand-in rpc-server and llama-server (recorded for the cleanup too)."""
    kids = [p for p in psutil.Process(node.proc.pid).children(recursive=True)
            if str(STANDIN) in " ".join(p.cmdline())]  # fmt: skip
    lm.engine_children.extend(kids)
    return kids


def gone(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {WAIT_S} s: {what}")
        time.sleep(0.05)


def chat(node: NodeProcess, *, stream: bool) -> urllib.request.Request:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS,
            "stream": stream}  # fmt: skip
    return urllib.request.Request(
        f"{node.url}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json"},
    )


def post(node: NodeProcess) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(chat(node, stream=False), timeout=WAIT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def peer_status(observer: NodeProcess, peer_id: str) -> str | None:
    for p in observer.status()["peers"]:
        if p["id"] == peer_id:
            return str(p["status"])
    return None


def sees(observer: NodeProcess, peer_id: str, status: str) -> Callable[[], bool]:
    return lambda: peer_status(observer, peer_id) == status


def test_sigkill_of_a_sidecar_takes_its_engine_children_along(
    mesh: Mesh, tmp_path: Path
) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    a = mesh.start_node("a", model=str(model), max_vram_gb=4)
    mesh.wait_for(a, lambda s: s["ready"], timeout=60, what="engine ready")
    kids = engine_children(mesh, a)
    kinds = sorted(" ".join(p.cmdline()).split(str(STANDIN))[1].split()[0] for p in kids)
    assert kinds == ["llama-server", "rpc-server"]
    # They run in sessions of their own: only PR_SET_PDEATHSIG ties them to the sidecar.
    assert all(os.getsid(p.pid) != os.getsid(a.proc.pid) for p in kids)
    os.kill(a.proc.pid, signal.SIGKILL)  # the sidecar alone, no chance to clean up
    a.proc.wait(timeout=WAIT_S)
    wait_until(lambda: all(gone(p) for p in kids), "engine children gone with their sidecar")


def test_sigterm_drains_says_goodbye_and_stops_the_engines(
    mesh: Mesh, tmp_path: Path
) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    a = mesh.start_node("a", model=str(model), max_vram_gb=4)
    b = mesh.start_node("b", join=mesh.join_token(a), max_vram_gb=2)
    st = mesh.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 2, timeout=60,
                       what="a hosts over a and b")  # fmt: skip
    a_id = st["node"]["id"]
    mesh.wait_for(b, lambda s: any(p["id"] == a_id and p["status"] == "alive"
                                   for p in s["peers"]), what="b sees a")  # fmt: skip
    kids = engine_children(mesh, a)
    assert len(kids) == 2

    stream = urllib.request.urlopen(chat(a, stream=True), timeout=WAIT_S)
    lines: list[str] = []
    while not lines or not lines[-1].startswith("data: "):
        lines.append(stream.readline().decode())
    # A request is in flight: now the node is asked to stop.
    os.kill(a.proc.pid, signal.SIGTERM)

    # New requests are refused with a clear 503 while the running one drains.
    refused: tuple[int, dict[str, Any]] = (0, {})
    deadline = time.monotonic() + WAIT_S
    while refused[0] != 503 and time.monotonic() < deadline:
        refused = post(a)
        time.sleep(0.02)
    assert refused[0] == 503, refused
    assert refused[1]["error"]["code"] == "shutting_down"
    assert "shutting down" in refused[1]["error"]["message"]

    # The request that was running completes: every token, then [DONE].
    rest = stream.read().decode()
    stream.close()
    events = [ln[len("data: "):] for ln in ("".join(lines) + rest).splitlines()
              if ln.startswith("data: ")]  # fmt: skip
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.split() == [f"t{i}" for i in range(TOKENS)]

    # Then Goodbye: b shows a as left (a death would show "dead", after the dead timeout).
    assert a.proc.wait(timeout=WAIT_S) == 0
    wait_until(lambda: peer_status(b, a_id) == "left", "b shows a as left")
    # And the engines were stopped before the sidecar exited.
    assert all(gone(p) for p in kids)


def test_a_killed_node_stays_dead_then_rejoins_under_its_id(
    mesh: Mesh, tmp_path: Path
) -> None:
    model = tiny_gguf(tmp_path / "tiny.gguf")
    a = mesh.start_node("a", model=str(model), max_vram_gb=4)
    token = mesh.join_token(a)
    b = mesh.start_node("b", join=token, max_vram_gb=2)
    c = mesh.start_node("c", join=token, max_vram_gb=1)
    mesh.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 3, timeout=60,
                  what="a hosts over a, b and c")  # fmt: skip
    c_id = c.status()["node"]["id"]
    engine_children(mesh, c)
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(timeout=WAIT_S)
    for observer in (a, b):
        wait_until(sees(observer, c_id, "dead"), "c declared dead")
    st = mesh.wait_for(a, lambda s: s["ready"] and c_id not in s["plan"]["order"],
                       what="a re-planned without c")  # fmt: skip
    assert len(st["plan"]["order"]) == 2
    # Restarted with the same state dir: the same key, so the same node id, one boot later.
    c2 = mesh.start_node("c", join=token, max_vram_gb=1)
    assert c2.status()["node"]["id"] == c_id
    for observer in (a, b):
        wait_until(sees(observer, c_id, "alive"), "c alive again")
    mesh.wait_for(a, lambda s: s["ready"] and c_id in s["plan"]["order"],
                  what="a plans c in again")  # fmt: skip
    assert (c2.state_dir / "boots").read_text() == "2\n"
    assert sum(1 for p in b.status()["peers"] if p["id"] == c_id) == 1  # one record, no ghost
