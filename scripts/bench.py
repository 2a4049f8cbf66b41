"""Benchmark: the same model and split through direct TCP llama.cpp RPC and through the mesh.

Prints load time, generation tok/s, both ratios (mesh / direct) and the bytes
that crossed the tunnel. Both paths run in this one invocation, on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_inference.cli.devmesh import LocalMesh  # noqa: E402
from mesh_inference.engine.backends import find_backend  # noqa: E402
from mesh_inference.models.refs import resolve_model  # noqa: E402
from mesh_inference.net.addresses import free_tcp_port  # noqa: E402

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short story about a robot learning to paint."},
]


def post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def wait_http(url: str, timeout: float = 300) -> None:
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
    """tok/s per run, from llama-server's own timings when present."""
    rates = []
    post(f"{base}/v1/chat/completions", {"messages": PROMPT, "max_tokens": 8, "temperature": 0})
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


def _stream_one(base: str, n_tokens: int, t0: float) -> tuple[float, int]:
    """One streamed request: (seconds from t0 to the first content token, tokens)."""
    body = {"messages": PROMPT, "max_tokens": n_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    req = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    first, tokens = -1.0, 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                tokens += 1
                if first < 0:
                    first = time.monotonic() - t0
    return first, tokens


def concurrent(base: str, clients: int, n_tokens: int) -> dict[str, float]:
    """``clients`` streamed requests at once: aggregate tok/s, worst and one-stream TTFT."""
    from concurrent.futures import ThreadPoolExecutor

    solo_ttft, _ = _stream_one(base, 4, time.monotonic())
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _i: _stream_one(base, n_tokens, t0), range(clients)))
    wall = time.monotonic() - t0
    return {
        "clients": clients,
        "agg_tok_s": sum(n for _f, n in results) / wall,
        "worst_ttft_s": max(f for f, _n in results),
        "ttft_s": solo_ttft,
    }


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )


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


def bench_direct(
    backend_name: str,
    model: Path,
    split: list[float],
    tmp: Path,
    threads: int,
    n_tokens: int,
    runs: int,
) -> dict[str, Any]:
    backend = find_backend(backend_name)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = [free_tcp_port() for _ in split]
        for i, port in enumerate(ports):
            cache = tmp / f"direct-cache-{i}"
            cache.mkdir(exist_ok=True)
            procs.append(
                start(
                    backend.rpc_server_command(port=port, threads=threads, cache_dir=cache),
                    backend.env(cache),
                    tmp / f"direct-rpc-{i}.log",
                )
            )
        for port in ports:
            deadline = time.monotonic() + 60
            import socket

            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        http = free_tcp_port()
        t0 = time.monotonic()
        procs.append(
            start(
                backend.llama_server_command(
                    model=model,
                    rpc_endpoints=[f"127.0.0.1:{p}" for p in ports],
                    tensor_split=split,
                    port=http,
                    ctx_size=4096,
                    threads=threads,
                    alias="bench",
                ),
                backend.env(),
                tmp / "direct-server.log",
            )
        )
        wait_http(f"http://127.0.0.1:{http}{backend.health_path}")
        load = time.monotonic() - t0
        rates = generate(f"http://127.0.0.1:{http}", n_tokens, runs)
        conc = concurrent(f"http://127.0.0.1:{http}", 8, n_tokens // 2)
        return {"load_s": load, "tok_s": sorted(rates)[len(rates) // 2], "runs": rates,
                "concurrent": conc}  # fmt: skip
    finally:
        stop(procs)


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


def kill_worker_and_wait(mesh: LocalMesh, host: Any, worker: Any) -> float:
    """SIGKILL a worker's sidecar; seconds until the host answers a request again."""
    os.killpg(worker.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    deadline = t0 + 120
    while time.monotonic() < deadline:
        st = host.status()
        if st["ready"] and len(st["plan"]["order"]) == 2:
            try:
                post(f"{host.url}/v1/chat/completions",
                     {"messages": PROMPT, "max_tokens": 1, "temperature": 0}, timeout=30)
                return time.monotonic() - t0
            except OSError:
                pass
        time.sleep(0.05)
    raise TimeoutError("the mesh did not serve again after a worker died")


def bench_mesh(
    backend_name: str, model_ref: str, tmp: Path, n_tokens: int, runs: int
) -> dict[str, Any]:
    mesh = LocalMesh(tmp / "mesh", extra_args=["--engine", backend_name, "--threads", "1"])
    try:
        a = mesh.start_node("a", model=model_ref, max_vram_gb=4)
        token = mesh.join_token(a)
        mesh.start_node("b", join=token, max_vram_gb=2)
        mesh.start_node("c", join=token, max_vram_gb=1)
        st = mesh.wait_for(
            a,
            lambda s: (
                len(s["plan"]["order"]) == 3 and s["engine"]["state"] in ("starting", "ready")
            ),
            timeout=120,
            what="3-node plan",
        )
        st = mesh.wait_for(a, lambda s: s["ready"], timeout=600, what="engine ready")
        # llama-server's own spawn → healthy time, as the direct path measures it.
        load = float(st["engine"]["startup_s"])
        before = st.get("tunnels", {})
        rates = generate(a.url, n_tokens, runs)
        after = a.status().get("tunnels", {})
        conc = concurrent(a.url, 8, n_tokens // 2)
        idle = idle_cost([n.proc.pid for n in mesh.nodes])
        failover_s = kill_worker_and_wait(mesh, a, mesh.nodes[2])
        return {
            "concurrent": conc,
            "idle": idle,
            "failover_s": failover_s,
            "load_s": load,
            "tok_s": sorted(rates)[len(rates) // 2],
            "runs": rates,
            "split": st["plan"]["tensor_split"],
            "tunnels_after_load": before,
            "tunnels_after_gen": after,
        }
    finally:
        mesh.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--engine", default="bin", choices=["bin", "embedded"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    resolved = resolve_model(args.model)
    assert resolved.path is not None, "model not on this machine"
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmpname:
        tmp = Path(tmpname)
        mesh = bench_mesh(args.engine, args.model, tmp, args.tokens, args.runs)
        split = [float(x) for x in mesh["split"]]
        direct = bench_direct(args.engine, resolved.path, split, tmp, 1, args.tokens, args.runs)
    tun = mesh["tunnels_after_gen"]
    up = sum(t.get("bytes_up", 0) for t in tun.values())
    down = sum(t.get("bytes_down", 0) for t in tun.values())
    load_up = sum(t.get("bytes_up", 0) for t in mesh["tunnels_after_load"].values())
    gen_tokens = args.tokens * (args.runs + 0) + 8
    print(f"model {args.model}  engine {args.engine}  split {split} (workers…, host last)")
    print(f"{'path':<8}{'load s':>9}{'tok/s':>9}  runs")
    print(
        f"{'direct':<8}{direct['load_s']:>9.2f}{direct['tok_s']:>9.1f}  "
        f"{[round(r, 1) for r in direct['runs']]}"
    )
    print(
        f"{'mesh':<8}{mesh['load_s']:>9.2f}{mesh['tok_s']:>9.1f}  "
        f"{[round(r, 1) for r in mesh['runs']]}"
    )
    print(
        f"ratio mesh/direct: load {mesh['load_s'] / direct['load_s']:.2f}x, "
        f"generation {mesh['tok_s'] / direct['tok_s']:.2f}x"
    )
    print(
        f"tunnel bytes: load {load_up / 1e6:.1f} MB host->workers; total up {up / 1e6:.1f} MB, "
        f"down {down / 1e6:.1f} MB; per generated token "
        f"≈ {(up + down - load_up) / gen_tokens / 1e3:.1f} kB"
    )
    dc, mc = direct["concurrent"], mesh["concurrent"]
    print(
        f"8 concurrent streams: aggregate {dc['agg_tok_s']:.1f} direct, {mc['agg_tok_s']:.1f} "
        f"mesh = {mc['agg_tok_s'] / dc['agg_tok_s']:.2f}x; worst TTFT {dc['worst_ttft_s']:.2f} s "
        f"direct, {mc['worst_ttft_s']:.2f} s mesh; one-stream TTFT ratio "
        f"{mc['ttft_s'] / dc['ttft_s']:.2f}x"
    )
    idle = mesh["idle"]
    print(f"sidecar idle: max RSS {idle['max_rss_mb']:.0f} MB, max CPU {idle['max_cpu_pct']:.1f}%")
    print(f"worker killed -> serving again: {mesh['failover_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"direct": direct, "mesh": mesh}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
