"""Micro-benchmark of the RPC tunnel: per-round-trip latency, bulk rate, sidecar CPU.

Paths, all on loopback, every box its own process (like the real thing)::

    direct: client ───────────────────────────────────────────────────────► server
    relay:  client ─► Python TCP relay ─► Python TCP relay ─────────────────► server
    mesh:   client ─► host sidecar TunnelListener ═QUIC═► worker bridge_to_local ─► server

``server`` is RPC-like (a blocking C-style loop, TCP_NODELAY): it reads a
request ``u32 request length | u32 reply length | request`` and answers
``reply length`` bytes. The relay hops use the tunnel's own ``bridge()``
over plain asyncio TCP, so relay vs mesh isolates what QUIC costs. QUIC
uses 1452-byte datagrams (a real LAN's limit).

Scenarios: ``small`` 64 B → 64 B; ``rpc`` one generated token's RPC traffic
to one worker as llama-server writes it (six sends, ~5.4 kB, then a 2.3 kB
reply); ``token`` 30 kB → 8 kB in one send; ``bulk`` one 64 MiB request (MB/s). For each,
the paths are measured in turn, ``--reps`` times, and the median is shown,
with the sidecars' CPU time per round trip (user + system, both hops).

    .venv/bin/python scripts/bench_tunnel.py [--rounds 2000] [--reps 3] [--json out.json]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BENCH_CODE") or str(ROOT))

REQ = struct.Struct("<II")


# ------------------------------------------------------------------ the RPC-like server
def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n])
        if k == 0:
            raise ConnectionError("eof")
        got += k


def _serve_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    head = bytearray(REQ.size)
    replies: dict[int, bytes] = {}
    try:
        while True:
            _recv_exact(conn, REQ.size, head)
            req_len, reply_len = REQ.unpack(head)
            while req_len:
                k = min(req_len, len(buf))
                _recv_exact(conn, k, buf)
                req_len -= k
            reply = replies.get(reply_len)
            if reply is None:
                reply = replies[reply_len] = bytes(reply_len)
            conn.sendall(reply)
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()


def run_server() -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    print(ls.getsockname()[1], flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


# ------------------------------------------------------------------ sidecars and relays
def _event_loop_runner(use_uvloop: bool, role: str) -> Any:
    if use_uvloop:
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    prefix = os.environ.get("BENCH_PROFILE")  # write cProfile stats of each sidecar here
    if not prefix:
        return runner

    def profiled(coro: Any) -> None:
        import cProfile
        import signal

        prof = cProfile.Profile()

        def dump(*_args: Any) -> None:
            prof.disable()
            prof.dump_stats(f"{prefix}.{role}.{os.getpid()}")
            os._exit(0)

        signal.signal(signal.SIGTERM, dump)
        prof.enable()
        runner(coro)

    return profiled


async def _relay(target: int) -> None:
    from mesh_inference.net.tunnel import _nodelay, bridge

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        r2, w2 = await asyncio.open_connection("127.0.0.1", target)
        _nodelay(w2)
        await bridge(reader, writer, r2, w2)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def _endpoint(mesh_hex: str, on_stream: Any) -> Any:
    from mesh_inference.core.identity import MeshCredentials, NodeIdentity
    from mesh_inference.net.endpoint import MeshEndpoint

    mesh_id, secret = mesh_hex.split(":")
    return MeshEndpoint(
        NodeIdentity.generate(),
        MeshCredentials(mesh_id, bytes.fromhex(secret)),
        host="127.0.0.1",
        max_datagram_size=1452,
        on_peer_connected=lambda conn: None,
        on_peer_lost=lambda peer, reason: None,
        on_control_frame=lambda peer, frame: None,
        on_stream=on_stream,
    )


async def _worker(mesh_hex: str, target: int) -> None:
    from mesh_inference.net.tunnel import bridge_to_local

    async def on_stream(peer: str, first: Any, reader: Any, writer: Any) -> None:
        await bridge_to_local(reader, writer, "127.0.0.1", target)

    ep = _endpoint(mesh_hex, on_stream)
    print(await ep.start(), flush=True)
    await asyncio.Event().wait()


async def _host(mesh_hex: str, worker_port: int) -> None:
    from mesh_inference.core.dcf import MessageType
    from mesh_inference.net.tunnel import TunnelListener

    async def no_streams(*args: Any) -> None:
        raise AssertionError("no streams to the host")

    ep = _endpoint(mesh_hex, no_streams)
    await ep.start()
    peer = await ep.dial(f"127.0.0.1:{worker_port}")

    async def opener() -> Any:
        return await ep.open_stream(peer, MessageType.OPEN_TUNNEL, b'{"service":"rpc"}')

    listener = TunnelListener(opener)
    print(await listener.start(), flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------ the client
class Proc:
    def __init__(
        self, *args: str, uvloop: bool = False, code: Path | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        argv = [sys.executable, __file__, *(["--uvloop"] if uvloop else []), *args]
        env = {**os.environ, **(env_extra or {})}
        if code is not None:  # another copy of mesh_inference (A/B in one run)
            env["BENCH_CODE"] = str(code)
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{args[0]} did not start")
        self.port = int(line)

    def cpu(self) -> float:
        import psutil

        t = psutil.Process(self.popen.pid).cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        import psutil

        return float(psutil.Process(self.popen.pid).memory_info().rss) / 2**20

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(5)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# One generated token's RPC traffic to one worker, as llama-server writes it (one send
# each): SET_TENSOR of the activations (576 floats) and of small inputs (positions, mask),
# GRAPH_RECOMPUTE, then GET_TENSOR, whose reply (the activations) is waited for.
RPC_TOKEN = [(305 + 2304, 0), (305 + 1024, 0), (305 + 4, 0), (305 + 4, 0), (13, 0), (312, 2304)]


def ping_pong(
    port: int, messages: list[tuple[int, int]], rounds: int, warmup: int = 200
) -> list[float]:
    """Seconds per round trip, ``rounds`` of them, on one fresh connection.

    A round trip writes each ``(request length, reply length)`` message with a send()
    of its own, then waits for all the replies.
    """
    sock = _connect(port)
    msgs = [REQ.pack(req, reply) + bytes(req) for req, reply in messages]
    reply = sum(r for _q, r in messages)
    buf = bytearray(max(reply, 1))
    out = []
    try:
        for i in range(warmup + rounds):
            t0 = time.perf_counter()
            for msg in msgs:
                sock.sendall(msg)
            _recv_exact(sock, reply, buf)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    finally:
        sock.close()
    return out


def bulk(port: int, nbytes: int) -> float:
    """MB/s of one request of ``nbytes`` (answered with 8 bytes once all arrived)."""
    sock = _connect(port)
    chunk = bytes(1 << 20)
    buf = bytearray(8)
    try:
        ping_pong_once = REQ.pack(0, 8)
        sock.sendall(ping_pong_once)
        _recv_exact(sock, 8, buf)  # the tunnel is open
        t0 = time.perf_counter()
        sock.sendall(REQ.pack(nbytes, 8))
        left = nbytes
        while left:
            k = min(left, len(chunk))
            sock.sendall(chunk[:k] if k < len(chunk) else chunk)
            left -= k
        _recv_exact(sock, 8, buf)
        return nbytes / (time.perf_counter() - t0) / 1e6
    finally:
        sock.close()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--token-rounds", type=int, default=500)
    ap.add_argument("--bulk-mb", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--uvloop", action="store_true", help="sidecars and relays run uvloop")
    ap.add_argument("--paths", default="direct,relay,mesh")
    ap.add_argument("--alt", type=Path, help="a directory holding another mesh_inference "
                    "package: its sidecars are measured too, as path 'alt'")  # fmt: skip
    ap.add_argument("--alt-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of the 'alt' sidecars (with or without --alt)")
    ap.add_argument("--alt-uvloop", choices=["yes", "no"], help="the 'alt' sidecars' loop")
    ap.add_argument("--scenarios", default="small,rpc,token,bulk")
    ap.add_argument("--json", type=Path)
    ap.add_argument("role", nargs="?", default="client")
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    if a.role == "server":
        run_server()
        return 0
    run = _event_loop_runner(a.uvloop, a.role)
    if a.role == "relay":
        run(_relay(int(a.args[0])))
        return 0
    if a.role == "worker":
        run(_worker(a.args[0], int(a.args[1])))
        return 0
    if a.role == "host":
        run(_host(a.args[0], int(a.args[1])))
        return 0

    from mesh_inference.core.identity import MeshCredentials

    mesh = MeshCredentials.generate()
    mesh_hex = f"{mesh.mesh_id}:{mesh.secret.hex()}"
    procs: list[Proc] = []
    try:
        server = Proc("server")
        procs.append(server)
        r2 = Proc("relay", str(server.port), uvloop=a.uvloop)
        r1 = Proc("relay", str(r2.port), uvloop=a.uvloop)
        worker = Proc("worker", mesh_hex, str(server.port), uvloop=a.uvloop)
        host = Proc("host", mesh_hex, str(worker.port), uvloop=a.uvloop)
        procs += [r2, r1, worker, host]
        paths = {"direct": (server.port, []), "relay": (r1.port, [r1, r2]),
                 "mesh": (host.port, [host, worker])}  # fmt: skip
        if a.alt is not None or a.alt_env:
            extra = dict(kv.split("=", 1) for kv in a.alt_env)
            alt_loop = a.uvloop if a.alt_uvloop is None else a.alt_uvloop == "yes"
            aw = Proc("worker", mesh_hex, str(server.port), uvloop=alt_loop, code=a.alt,
                      env_extra=extra)  # fmt: skip
            ah = Proc("host", mesh_hex, str(aw.port), uvloop=alt_loop, code=a.alt,
                      env_extra=extra)  # fmt: skip
            procs += [aw, ah]
            paths["alt"] = (ah.port, [ah, aw])
        paths = {k: v for k, v in paths.items() if k in a.paths.split(",") or k == "alt"}
        scenarios = [("small", [(64, 64)], a.rounds), ("rpc", RPC_TOKEN, a.rounds),
                     ("token", [(30_000, 8_000)], a.token_rounds)]  # fmt: skip
        scenarios = [sc for sc in scenarios if sc[0] in a.scenarios.split(",")]
        res: dict[str, dict[str, dict[str, list[float]]]] = {}
        for _rep in range(a.reps):
            for scen, messages, rounds in scenarios:
                for name, (port, hops) in paths.items():
                    c0 = sum(p.cpu() for p in hops)
                    lat = ping_pong(port, messages, rounds)
                    cpu = (sum(p.cpu() for p in hops) - c0) / (rounds + 200)
                    r = res.setdefault(scen, {}).setdefault(name, {})
                    r.setdefault("p50", []).append(pct(lat, 0.5))
                    r.setdefault("p99", []).append(pct(lat, 0.99))
                    r.setdefault("cpu", []).append(cpu)
            for name, (port, hops) in paths.items():
                if "bulk" not in a.scenarios.split(","):
                    break
                c0 = sum(p.cpu() for p in hops)
                rate = bulk(port, a.bulk_mb << 20)
                cpu = (sum(p.cpu() for p in hops) - c0) / (a.bulk_mb << 20) * 1e6
                r = res.setdefault("bulk", {}).setdefault(name, {})
                r.setdefault("mb_s", []).append(rate)
                r.setdefault("cpu_s_per_mb", []).append(cpu)
        rss = {name: max(p.rss_mb() for p in hops) for name, (_port, hops) in paths.items()
               if hops}  # fmt: skip
    finally:
        for p in reversed(procs):
            p.stop()

    med = statistics.median
    loop = "uvloop" if a.uvloop else "asyncio"
    print(f"bench_tunnel: {a.reps} reps, medians; sidecars on {loop}; 1452-B datagrams")
    for scen in [sc for sc in ("small", "rpc", "token") if sc in res]:
        print(f"{scen:<6} {'path':<7}{'p50 µs':>9}{'p99 µs':>9}{'hop CPU µs/rt':>15}")
        for name, r in res[scen].items():
            print(f"{'':<7}{name:<7}{med(r['p50']) * 1e6:>9.0f}{med(r['p99']) * 1e6:>9.0f}"
                  f"{med(r['cpu']) * 1e6:>15.0f}")  # fmt: skip
        if "mesh" in res[scen]:
            m = res[scen]["mesh"]
            for base in ("direct", "relay", "alt"):
                if base in res[scen]:
                    b = res[scen][base]
                    print(f"{'':<7}mesh/{base}: p50 {med(m['p50']) / med(b['p50']):.2f}x, "
                          f"p99 {med(m['p99']) / med(b['p99']):.2f}x")  # fmt: skip
    print(f"bulk   {'path':<7}{'MB/s':>9}{'hop CPU s/MB':>15}")
    for name, r in res.get("bulk", {}).items():
        print(f"{'':<7}{name:<7}{med(r['mb_s']):>9.1f}{med(r['cpu_s_per_mb']):>15.4f}")
    print("sidecar RSS after the run (MB, the larger hop): "
          + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
