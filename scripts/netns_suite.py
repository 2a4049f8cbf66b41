"""Failover across "machines": 3-5 real nodes, each in its own network namespace (root only).

    sudo .venv/bin/python scripts/netns_suite.py [--nodes 4] [--markdown docs/failover-run.md]

Every node is a real ``python -m mesh_inference`` process with the real
llama.cpp engine (``--threads 1``) on the shipped SmolLM2, in its own network
namespace; the namespaces are joined by a bridge that lives in one more
namespace (the same layout as ``tests/test_netns_mesh.py``), all created here
and deleted on the way out, also when a step fails or the script is
interrupted. Nodes use the real default ports (9337 for QUIC and HTTP: each
namespace has its own), so a restarted node comes back at the same address.

Scenarios, one after another on one mesh:

1. ``kill -9`` a worker, then restart it with the same state dir (same node id);
2. ``kill -9`` the host, then restart it (it takes the host role back);
3. partition: the host's bridge port goes down (it is cut from every peer),
   both sides keep serving (SmolLM2 fits every node), then the port comes up
   again and the views must converge to one host and one plan.

For each it prints **detection** (death or cut → each peer reports the node
dead, from the peers' ``/api/events``), **serving again** (death → a chat
request sent at once through a surviving node answers 200: it waits inside
the gateway, ``--request-wait``, rather than fail) and **converged** (every
node reports the same host and plan, engine ready). ``tests/test_netns_failover.py``
runs the same scenarios on 3 nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_inference.cli.devmesh import LocalMesh, NodeProcess  # noqa: E402

PORT = 9337  # the default HTTP and QUIC port: every namespace has its own
PREFIX = "mifo"  # namespaces are named mifo-<pid of the creator>-<n>
SUBNET = "10.78.0"
CLONE_NEWNET = 0x40000000
CHAT = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}

Status = dict[str, Any]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- namespaces
def unavailable() -> str | None:
    """Why this machine cannot run the suite, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip netns)"
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if out.returncode != 0:
        return f"ip netns does not work here: {out.stderr.strip()}"
    return None


def ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces an earlier run left behind (its process is gone): ours only."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        ours = len(parts) == 3 and parts[0] == PREFIX and parts[1].isdigit()
        if ours and not _pid_alive(int(parts[1])):
            # Nodes of that run (started in its namespaces, in their own sessions) outlive it
            # when it was killed -9: end them, by pid, before their namespace goes.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            removed.append(name)
    return removed


class NetnsLab:
    """``n`` "machines" (namespaces with one veth each) on a bridge in a namespace of its own.

    ``cut(i)``/``mend(i)`` set machine i's bridge port down/up: it loses (regains)
    every peer at once, as when its cable is pulled."""

    def __init__(self, n: int) -> None:
        tag = uuid.uuid4().hex[:5]
        base = f"{PREFIX}-{os.getpid()}"
        self.bridge = f"{base}-br"
        self.hosts = [f"{base}-{i}" for i in range(n)]
        self.ports = [f"mb{i}{tag}" for i in range(n)]  # bridge side (≤ 15 chars)
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self._created: list[str] = []

    def __enter__(self) -> NetnsLab:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        for ns in (self.bridge, *self.hosts):
            ip("netns", "add", ns)
            self._created.append(ns)
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            inner = f"mv{i}{self.ports[i][3:]}"
            ip("link", "add", inner, "netns", ns, "type", "veth",
               "peer", "name", self.ports[i], "netns", self.bridge)  # fmt: skip
            ip("-n", self.bridge, "link", "set", self.ports[i], "master", "br0")
            ip("-n", self.bridge, "link", "set", self.ports[i], "up")
            ip("-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        ip("-n", self.bridge, "link", "set", self.ports[i], "down")

    def mend(self, i: int) -> None:
        ip("-n", self.bridge, "link", "set", self.ports[i], "up")

    def close(self) -> None:
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._created.clear()


_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(ns: str) -> None:
    """Move the calling *thread* into network namespace ``ns`` (sockets it opens live there)."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- HTTP in a namespace
def http_json(
    port: int, method: str, path: str, body: object = None,
    headers: dict[str, str] | None = None, timeout: float = 60.0,
) -> tuple[int, Any]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


class Watcher:
    """Follows one node's ``/api/events`` from inside its namespace; keeps every status
    document with the monotonic time it arrived. Reconnects while the node is down."""

    def __init__(self, name: str, ns: str | None, port: int, token: str) -> None:
        self.name, self.ns, self.port, self.token = name, ns, port, token
        self.history: list[tuple[float, Status]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.ns is not None:
            enter_netns(self.ns)
        while not self._stop.is_set():
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                self._follow()
            self._stop.wait(0.1)

    def _follow(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        self._conn = conn
        try:
            conn.request("GET", "/api/events", headers={"authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            if resp.status != 200:
                return
            event, data = "", []
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    return
                text = line.decode().rstrip("\r\n")
                if text.startswith("event:"):
                    event = text[6:].strip()
                elif text.startswith("data:"):
                    data.append(text[5:].strip())
                elif not text:
                    if event == "status" and data:
                        doc = json.loads("\n".join(data))
                        with self._cond:
                            self.history.append((time.monotonic(), doc))
                            del self.history[:-4000]
                            self._cond.notify_all()
                    event, data = "", []
        finally:
            conn.close()

    def first(self, pred: Callable[[Status], bool], after: float, timeout: float) -> float | None:
        """Monotonic arrival time of the first status after ``after`` that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for t, doc in self.history[seen:]:
                    if t >= after and pred(doc):
                        return t
                seen = len(self.history)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def latest(self) -> tuple[float, Status] | None:
        with self._cond:
            return self.history[-1] if self.history else None

    def streak(self, pred: Callable[[Status], bool]) -> float | None:
        """When the node's current run of statuses satisfying ``pred`` began (None: it does not)."""
        with self._cond:
            start = None
            for t, doc in reversed(self.history):
                if not pred(doc):
                    break
                start = t
            return start

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)


# ---------------------------------------------------------------------------- predicates
def peer_status(doc: Status, node_id: str) -> str | None:
    for p in doc["peers"]:
        if p["id"] == node_id:
            return str(p["status"])
    return None


def reports_gone(node_id: str) -> Callable[[Status], bool]:
    return lambda d: peer_status(d, node_id) in ("dead", "left", None)


def serves(ids: set[str], host: str | None = None) -> Callable[[Status], bool]:
    """The node's view: the plan is exactly ``ids`` (hosted by ``host``) and the engine is ready."""
    def pred(d: Status) -> bool:
        order = set(d["plan"]["order"])
        return bool(d["ready"]) and order == ids and (host is None or d["host_id"] == host)
    return pred


# ---------------------------------------------------------------------------- the suite
class Probe:
    """Chat requests through one node, one after another, from ``t0`` until ``stop()``: the
    first 200 (serving again) and the slowest answer while the mesh changed."""

    def __init__(self, suite: Suite, m: Machine, t0: float) -> None:
        self.m, self.t0 = m, t0
        self.results: list[tuple[float, float, int]] = []  # sent, answered, status
        self._ok = threading.Event()
        self._stop = threading.Event()
        self._suite = suite
        self._future = suite._bg.submit(self._run)

    def _run(self) -> None:
        deadline = self.t0 + self._suite.timeout
        closing = self._suite._closing
        while not (self._stop.is_set() or closing.is_set()) and time.monotonic() < deadline:
            sent = time.monotonic()
            t, status, body = self._suite.chat_async(self.m).result()
            self.results.append((sent, t, status))
            if status == 200:
                self._ok.set()
            else:
                log(f"  via {self.m.name}: {status} {str(body)[:200]}")
                self._stop.wait(0.5)

    def serving(self) -> float | None:
        """Seconds from ``t0`` to the first 200 (waits for it)."""
        self._ok.wait(max(0.0, self.t0 + self._suite.timeout - time.monotonic()))
        return next((t - self.t0 for _s, t, status in self.results if status == 200), None)

    def stop(self) -> str:
        self._stop.set()
        self._future.result()
        ok = sum(1 for *_x, status in self.results if status == 200)
        slowest = max((t - sent for sent, t, _st in self.results), default=0.0)
        return (f"{len(self.results)} requests via {self.m.name} one after another: "
                f"{ok} × 200, slowest {slowest:.1f} s")


@dataclass
class Machine:
    name: str
    ns: str | None
    vram_gb: float
    model: bool
    node: NodeProcess | None = None
    node_id: str = ""
    watcher: Watcher | None = None
    pool: ThreadPoolExecutor | None = None  # threads inside the namespace, for requests


@dataclass
class Result:
    scenario: str
    detection: dict[str, float | None] = field(default_factory=dict)  # peer → s
    serving: dict[str, float | None] = field(default_factory=dict)  # via node → s
    converged: float | None = None
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        det = ", ".join(f"{k} {_s(v)}" for k, v in self.detection.items()) or "-"
        srv = ", ".join(f"via {k} {_s(v)}" for k, v in self.serving.items()) or "-"
        return (f"| {self.scenario} | {det} | {srv} | {_s(self.converged)} | "
                f"{'; '.join(self.notes)} |")


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"


class Suite:
    def __init__(self, lab: NetnsLab | None, root: Path, n: int, *, request_wait: float = 30.0,
                 timeout: float = 180.0, partition_hold: float = 15.0) -> None:  # fmt: skip
        self.lab = lab
        self.partition_hold = partition_hold  # how long a partition lasts before it heals
        self.timeout = timeout
        self.request_wait = request_wait
        self.mesh = LocalMesh(root, extra_args=["--threads", "1"])
        names = [chr(ord("a") + i) for i in range(n)]
        self.machines = [
            Machine(name, lab.hosts[i] if lab else None, float(n - i), model=(i == 0))
            for i, name in enumerate(names)
        ]  # a holds the most memory: it is the host while it is alive
        self.results: list[Result] = []
        self._bg = ThreadPoolExecutor(4, thread_name_prefix="suite")  # waits, in no namespace
        self._closing = threading.Event()

    # -------------------------------------------------------------- plumbing
    def m(self, name: str) -> Machine:
        return next(x for x in self.machines if x.name == name)

    def _pool(self, m: Machine) -> ThreadPoolExecutor:
        if m.pool is None:
            init: Callable[..., None] | None = enter_netns if m.ns else None
            m.pool = ThreadPoolExecutor(4, thread_name_prefix=f"ns-{m.name}", initializer=init,
                                        initargs=(m.ns,) if m.ns else ())  # fmt: skip
        return m.pool

    def _port(self, m: Machine) -> int:
        assert m.node is not None
        return m.node.http_port

    def chat_async(self, m: Machine, timeout: float = 180.0) -> Future[tuple[float, int, Any]]:
        """A chat request through ``m``'s gateway, sent now: (time answered, status, body)."""
        port = self._port(m)

        def go() -> tuple[float, int, Any]:
            try:
                status, body = http_json(port, "POST", "/v1/chat/completions", CHAT,
                                         {"x-request-id": uuid.uuid4().hex}, timeout)  # fmt: skip
            except (OSError, http.client.HTTPException) as exc:
                status, body = 0, repr(exc)
            return time.monotonic(), status, body

        return self._pool(m).submit(go)

    def probe(self, m: Machine, t0: float) -> Probe:
        """Back-to-back chat requests through ``m`` from now on (the first sent at ``t0``)."""
        return Probe(self, m, t0)

    def start_node(self, m: Machine, join: str | None) -> None:
        args = ["--quic-port", str(PORT), "--request-wait", str(self.request_wait)]
        if m.node is not None:
            m.node = self.mesh.restart_node(m.node, join=join)
        else:
            m.node = self.mesh.start_node(
                m.name, model="smollm2-135m" if m.model else None, join=join,
                max_vram_gb=m.vram_gb, http_port=PORT if m.ns else 0, args=args, netns=m.ns,
                quic_host="0.0.0.0" if m.ns else "127.0.0.1",
            )  # fmt: skip
        node_id = json.loads((m.node.state_dir / "node.json").read_text())["node_id"]
        if m.node_id and node_id != m.node_id:
            raise AssertionError(f"{m.name} came back as {node_id}, not {m.node_id}")
        m.node_id = node_id
        if m.watcher is None:
            m.watcher = Watcher(m.name, m.ns, m.node.http_port, m.node.console_token)

    def alive(self) -> list[Machine]:
        return [m for m in self.machines if m.node is not None and m.node.proc.poll() is None]

    def token_of(self, m: Machine) -> str:
        assert m.node is not None
        return self.mesh.join_token(m.node)

    def wait_converged(self, group: list[Machine], t0: float, host: Machine | None = None
                       ) -> float | None:  # fmt: skip
        """Seconds from ``t0`` until every node of ``group`` reports the plan of exactly
        ``group`` (hosted by ``host``), engine ready."""
        pred = serves({x.node_id for x in group}, host.node_id if host else None)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            starts = [x.watcher.streak(pred) if x.watcher else None for x in group]
            one_host = len({self.view(x).get("host_id") for x in group}) == 1
            if one_host and all(s is not None for s in starts):
                return max(max(s for s in starts if s is not None) - t0, 0.0)
            time.sleep(0.1)
        return None

    def view(self, m: Machine) -> Status:
        """``m``'s latest status document ({} before the first)."""
        latest = m.watcher.latest() if m.watcher else None
        return latest[1] if latest else {}

    def describe(self, m: Machine) -> str:
        latest = m.watcher.latest() if m.watcher else None
        if latest is None:
            return f"{m.name}: no status"
        d = latest[1]
        names = {x.node_id: x.name for x in self.machines}
        order = [names.get(i, i) for i in d["plan"]["order"]]
        return (f"{m.name}: host {names.get(d['host_id'], d['host_id'])} plan {order} "
                f"ready {d['ready']}")  # fmt: skip

    # -------------------------------------------------------------- scenarios
    def start(self) -> float:
        t0 = time.monotonic()
        first = self.machines[0]
        self.start_node(first, None)
        token = self.token_of(first)
        for m in self.machines[1:]:
            self.start_node(m, token)
        took = self.wait_converged(self.machines, t0, first)
        if took is None:
            raise TimeoutError("the mesh did not come up: " +
                               "; ".join(self.describe(x) for x in self.machines))
        log(f"mesh of {len(self.machines)} ready in {took:.1f} s: "
            f"{self.describe(self.machines[-1])}")  # fmt: skip
        return took

    def kill(self, victim: Machine, *, via: Machine, label: str) -> Result:
        """SIGKILL ``victim``; detection on every survivor, serving again through ``via``."""
        assert victim.node is not None
        res = Result(label)
        survivors = [x for x in self.alive() if x is not victim]
        hosts = {self.view(x).get("host_id") for x in survivors}
        t0 = time.monotonic()
        victim.node.kill(signal.SIGKILL)
        probe = self.probe(via, t0)
        for x in survivors:
            assert x.watcher is not None
            t = x.watcher.first(reports_gone(victim.node_id), t0, self.timeout)
            res.detection[x.name] = None if t is None else t - t0
        new_host = None if victim.node_id in hosts else next(
            (x for x in survivors if x.node_id in hosts), None)
        res.serving[via.name] = probe.serving()
        res.converged = self.wait_converged(survivors, t0, new_host)
        time.sleep(1.0)
        res.notes += [self.describe(via), probe.stop()]
        log(f"{label}: detection {res.detection}, serving again {res.serving}, "
            f"converged {_s(res.converged)}")  # fmt: skip
        self.results.append(res)
        return res

    def rejoin(self, m: Machine, *, via: Machine, label: str) -> Result:
        """Restart ``m`` with its state dir; every node must plan with it again."""
        res = Result(label)
        t0 = time.monotonic()
        probe = self.probe(via, t0)
        old_id = m.node_id
        self.start_node(m, self.token_of(via))
        assert m.node_id == old_id
        host = self.machines[0] if self.machines[0].node and \
            self.machines[0].node.proc.poll() is None else None
        res.converged = self.wait_converged(self.alive(), t0, host)
        res.serving[via.name] = probe.serving()
        time.sleep(1.0)
        res.notes += [f"same node id {m.node_id}", probe.stop()]
        log(f"{label}: converged {_s(res.converged)}; {res.notes[-1]}")
        self.results.append(res)
        return res

    def partition(self, cut: Machine, *, via: Machine, label: str) -> tuple[Result, Result]:
        """Cut ``cut`` off the bridge: both sides must serve; then mend and converge."""
        assert self.lab is not None and cut.ns is not None
        res = Result(label)
        others = [x for x in self.alive() if x is not cut]
        t0 = time.monotonic()
        self.lab.cut(self.machines.index(cut))
        alone = self.probe(cut, t0)
        rest = self.probe(via, t0)
        assert cut.watcher is not None
        for x in others:
            assert x.watcher is not None
            t = x.watcher.first(reports_gone(cut.node_id), t0, self.timeout)
            res.detection[x.name] = None if t is None else t - t0
        t = cut.watcher.first(
            lambda d: all(peer_status(d, x.node_id) in ("dead", "left", None) for x in others),
            t0, self.timeout)  # fmt: skip
        res.detection[f"{cut.name} (all others)"] = None if t is None else t - t0
        res.serving[cut.name] = alone.serving()
        res.serving[via.name] = rest.serving()
        side = self.wait_converged(others, t0)
        mine = self.wait_converged([cut], t0, cut)
        res.converged = None if side is None or mine is None else max(side, mine)
        time.sleep(1.0)
        res.notes += [f"two meshes: {self.describe(cut)}; {self.describe(via)}", alone.stop(),
                      rest.stop()]  # fmt: skip
        log(f"{label}: detection {res.detection}, serving {res.serving}, "
            f"both sides planned {_s(res.converged)}")  # fmt: skip
        self.results.append(res)

        # Dialers back off (up to 5 s between tries) while the peer is unreachable.
        time.sleep(max(0.0, t0 + self.partition_hold - time.monotonic()))
        healed = Result(f"heal after {self.partition_hold:.0f} s ({cut.name}'s port up)")
        t1 = time.monotonic()
        self.lab.mend(self.machines.index(cut))
        probe = self.probe(via, t1)
        group = self.alive()
        healed.converged = self.wait_converged(group, t1, self.machines[0])
        healed.serving[via.name] = probe.serving()
        time.sleep(1.0)
        hosts = {self.view(x).get("host_id") for x in group}
        plans = {tuple(self.view(x).get("plan", {}).get("order", ())) for x in group}
        healed.notes += [f"{len(hosts)} host, {len(plans)} plan across {len(group)} nodes",
                         probe.stop()]  # fmt: skip
        log(f"heal: one host/plan after {_s(healed.converged)}; {'; '.join(healed.notes)}")
        self.results.append(healed)
        return res, healed

    def run_all(self) -> list[Result]:
        a, b, c = self.machines[0], self.machines[1], self.machines[2]
        worker = self.machines[-1]
        self.kill(worker, via=c if worker is not c else b, label=f"kill -9 worker {worker.name}")
        self.rejoin(worker, via=b, label=f"restart worker {worker.name}")
        self.kill(a, via=c, label=f"kill -9 host {a.name}")
        self.rejoin(a, via=c, label=f"restart host {a.name}")
        if self.lab is not None:
            self.partition(a, via=c, label=f"partition: {a.name} (host) cut off")
        return self.results

    def close(self) -> None:
        self._closing.set()
        self.mesh.stop()
        self._bg.shutdown(wait=True, cancel_futures=True)
        for m in self.machines:
            if m.watcher is not None:
                m.watcher.close()
            if m.pool is not None:
                m.pool.shutdown(wait=True, cancel_futures=True)

    def problems(self) -> list[str]:
        """What went wrong: a peer that never noticed, a side that never served again, views
        that never converged."""
        out = []
        for r in self.results:
            out += [f"{r.scenario}: {k} never reported it dead"
                    for k, v in r.detection.items() if v is None]  # fmt: skip
            out += [f"{r.scenario}: no 200 via {k}" for k, v in r.serving.items() if v is None]
            if r.converged is None:
                out.append(f"{r.scenario}: views did not converge")
        return out

    def table(self) -> str:
        lines = [
            "| event (t = 0) | detection: t → each peer reports the node dead | serving: t → "
            "a chat request sent at t through that node answers 200 | converged: t → every "
            "node reports one host, one plan, engine ready | notes |",
            "|---|---|---|---|---|",
        ]
        return "\n".join([*lines, *(r.row() for r in self.results)])


@contextlib.contextmanager
def suite(n: int, root: Path, **kw: Any) -> Iterator[Suite]:
    """The namespaces, the mesh on them and its watchers; all removed on the way out."""
    with NetnsLab(n) as lab:
        s = Suite(lab, root, n, **kw)
        try:
            yield s
        finally:
            s.close()


def _on_sigterm(*_: object) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks: nodes, namespaces


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4, choices=range(3, 6), metavar="3-5")
    ap.add_argument("--request-wait", type=float, default=30.0)
    ap.add_argument("--partition-seconds", type=float, default=15.0,
                    help="how long the partition lasts before it heals")
    ap.add_argument("--state", type=Path, help="state dirs (default: a temporary directory)")
    ap.add_argument("--markdown", type=Path, help="also write the results table here")
    args = ap.parse_args()
    reason = unavailable()
    if reason:
        print(f"netns_suite: {reason}", file=sys.stderr)
        return 2
    from mesh_inference.engine.backends import find_backend

    find_backend("bin")  # fails early, with the reason, without the real engine
    signal.signal(signal.SIGTERM, _on_sigterm)
    stale = remove_stale_namespaces()
    if stale:
        log(f"removed namespaces an earlier run left: {stale}")
    import tempfile

    with contextlib.ExitStack() as stack:
        root = args.state or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mifo-")))
        s = stack.enter_context(suite(args.nodes, root, request_wait=args.request_wait,
                                      partition_hold=args.partition_seconds))
        log(f"{args.nodes} namespaces on a bridge ({s.lab.bridge if s.lab else '-'}); "
            "starting the mesh…")  # fmt: skip
        startup = s.start()
        s.run_all()
        table = s.table()
        header = (f"{args.nodes} nodes, one namespace each, SmolLM2 with the real engine "
                  f"(--threads 1); mesh up in {startup:.1f} s; request-wait "
                  f"{args.request_wait:.0f} s; {time.strftime('%Y-%m-%d %H:%M')}")
        print(f"\n{header}\n\n{table}\n", flush=True)
        if args.markdown:
            args.markdown.write_text(f"{header}\n\n{table}\n")
        problems = s.problems()
        for p in problems:
            print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
