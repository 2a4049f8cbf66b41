"""Start a local 3-node mesh on the shipped SmolLM2 model; Ctrl-C stops it.

The demo outlives its nodes: kill one (``kill -9 <pid>``, the pids are in the
table it prints) and it says which node died, waits until the mesh has
re-formed without it (a new host if it was the host) and says so; the API of
every surviving node keeps answering. ``r`` + Enter restarts the last dead
node (``r node-b`` a given one) with its state dir, so it rejoins under the
same node id.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import sys
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_inference.cli.devmesh import LocalMesh, NodeProcess  # noqa: E402

NODES = (("node-a", 4.0), ("node-b", 2.0), ("node-c", 1.0))  # name, --max-vram GB


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def say(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass
class Waiting:
    """A change the demo waits to see: the mesh serving on exactly ``ids``."""

    what: str  # "re-formed without node-c", "node-c rejoined"
    ids: set[str]
    since: float
    then: str = ""  # printed once it happened


class Demo:
    def __init__(self, mesh: LocalMesh, model: str, port: int) -> None:
        self.mesh = mesh
        self.model = model
        self.port = port
        self.ids: dict[str, str] = {}  # name → node id (kept across restarts: same state dir)
        self.dead: list[NodeProcess] = []  # in order of death, not restarted yet
        self.waiting: Waiting | None = None
        self._next_check = 0.0

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        (first, vram), *rest = NODES
        a = self.mesh.start_node(first, model=self.model, max_vram_gb=vram, http_port=self.port)
        token = self.mesh.join_token(a)
        for name, gb in rest:
            self.mesh.start_node(name, join=token, max_vram_gb=gb)
        say(f"starting a 3-node mesh (logs in {self.mesh.root}/*/node.log) ...")
        t0 = time.monotonic()
        st = self.mesh.wait_for(
            a, lambda s: s["ready"] and len(s["plan"]["order"]) == len(NODES), timeout=300,
            what="engine ready on 3 nodes",
        )  # fmt: skip
        for node in self.mesh.nodes:
            self.ids[node.name] = node.status()["node"]["id"]
        plan = st["plan"]
        say(f"ready in {time.monotonic() - t0:.1f} s: model {st['model']['name']}, "
            f"split {plan['tensor_split']} over {len(plan['order'])} nodes")  # fmt: skip
        self.print_nodes(st)
        say(f"\n  console  {a.console_url}\n  API      {a.url}/v1\n  token    {token}\n")
        say(f"  try: curl {a.url}/v1/chat/completions -H 'content-type: application/json' "
            '-d \'{"messages":[{"role":"user","content":"Hello!"}]}\'\n')  # fmt: skip
        say("Kill a node (kill -9 <pid>): the mesh re-forms and keeps serving. "
            "r + Enter restarts the last dead node. Ctrl-C stops all nodes.")

    def name_of(self, node_id: str | None) -> str:
        return next((n for n, i in self.ids.items() if i == node_id), node_id or "-")

    def print_nodes(self, st: dict[str, Any]) -> None:
        for node in self.alive():
            role = "host" if self.ids.get(node.name) == st["host_id"] else "worker"
            say(f"  {node.name}  id {self.ids.get(node.name, '?')}  pid {node.proc.pid:<7}  "
                f"{role:<6}  {node.url}")  # fmt: skip

    def alive(self) -> list[NodeProcess]:
        return [n for n in self.mesh.nodes if n.proc.poll() is None]

    # ------------------------------------------------------------------ watching
    def check_processes(self) -> None:
        for node in list(self.mesh.nodes):
            code = node.proc.poll()
            if code is None:
                continue
            # Reaped: never signal that pid again (devmesh's stop would).
            self.mesh.nodes.remove(node)
            self.dead = [d for d in self.dead if d.name != node.name] + [node]
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            if code > 0:  # it failed by itself: show why
                print(node.log_tail(20), file=sys.stderr, flush=True)
            survivors = self.alive()
            if not survivors:
                say(f"node {node.name} died ({how}) and no node is left")
                continue
            say(f"node {node.name} died (pid {node.proc.pid}, {how}); "
                f"the mesh re-forms without it…")  # fmt: skip
            self.waiting = Waiting(
                f"mesh re-formed without {node.name}",
                {self.ids[n.name] for n in survivors}, time.monotonic(),
                then=f"press r + Enter to restart {node.name} (same state dir, same node id)",
            )  # fmt: skip

    def check_mesh(self) -> None:
        """Is the change we wait for visible yet (the survivors' view: plan and engine)?"""
        if self.waiting is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + 0.5
        alive = self.alive()
        if not alive:
            return
        try:
            st = alive[0].status(timeout=2)
        except (urllib.error.URLError, OSError, ValueError):
            return
        w = self.waiting
        if not (st["ready"] and set(st["plan"]["order"]) == w.ids):
            return
        serving = next((n for n in alive if n.name == NODES[0][0]), alive[0])
        split = ", ".join(f"{self.name_of(i)} {s}" for i, s in
                          zip(st["plan"]["order"], st["plan"]["tensor_split"], strict=False))
        say(f"{w.what} in {time.monotonic() - w.since:.1f} s: {len(w.ids)} nodes, "
            f"host {self.name_of(st['host_id'])}, split {split}; API {serving.url}/v1 answers")
        if w.then:
            say(w.then)
        self.waiting = None

    def command(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        if words[0] != "r":
            say("commands: r (restart the last dead node), r NAME (restart NAME)")
            return
        if not self.dead:
            say("no dead node to restart")
            return
        target = self.dead[-1] if len(words) == 1 else next(
            (d for d in self.dead if d.name == words[1]), None)  # fmt: skip
        if target is None:
            say(f"{words[1]} is not a dead node ({', '.join(d.name for d in self.dead)})")
            return
        survivors = self.alive()
        join = self.mesh.join_token(survivors[0]) if survivors else None
        say(f"restarting {target.name} (state dir {target.state_dir})…")
        try:
            node = self.mesh.restart_node(target, join=join)
        except (RuntimeError, TimeoutError) as exc:
            say(f"restarting {target.name} failed: {exc}")
            return
        self.dead.remove(target)
        same = node.status()["node"]["id"] == self.ids[node.name]
        say(f"{node.name} is back: pid {node.proc.pid}, "
            f"{'same' if same else 'NEW'} node id {self.ids[node.name]}")  # fmt: skip
        self.waiting = Waiting(f"{node.name} rejoined: mesh re-formed",
                               {self.ids[n.name] for n in self.alive()}, time.monotonic())


def read_command(stdin_open: bool, timeout: float) -> tuple[bool, str | None]:
    """Wait up to ``timeout`` for a line on stdin: (stdin still open, the line or None)."""
    if not stdin_open:
        time.sleep(timeout)
        return False, None
    try:
        ready, _, _ = select.select([sys.stdin], [], [], timeout)
    except (OSError, ValueError):
        time.sleep(timeout)
        return False, None
    if not ready:
        return True, None
    line = sys.stdin.readline()
    if not line:  # EOF: keep running, without commands
        return False, None
    return True, line.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=9337,
                    help="API/console port of the first node (0: any free port)")
    ap.add_argument("--state-dir", "--state", dest="state", type=Path, default=ROOT / ".demo",
                    help="one state dir per node under this directory (default .demo)")
    args = ap.parse_args()
    port = args.port if args.port and port_free(args.port) else 0
    # One machine plays three: one engine thread per node keeps them from fighting.
    mesh = LocalMesh(args.state, extra_args=["--threads", "1"])
    stop = False

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # while starting: unwind to the finally below

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    demo = Demo(mesh, args.model, port)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        demo.start()
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        stdin_open = True
        while not stop:
            demo.check_processes()
            if not demo.alive():
                break
            demo.check_mesh()
            stdin_open, line = read_command(stdin_open, 0.5)
            if line is not None and not stop:
                demo.command(line)
    finally:
        # A second Ctrl-C must not cut the stop short: every node gets its SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("stopping…")
        mesh.stop()
    return 0 if stop else 1


if __name__ == "__main__":
    raise SystemExit(main())
