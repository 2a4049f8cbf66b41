"""Delaying relays for the benchmark matrix: a fixed one-way delay on a loopback link.

    bench_relay.py udp LISTEN TARGET --delay-ms D   # in front of a node's QUIC port
    bench_relay.py tcp LISTEN TARGET --delay-ms D   # between llama-server and an rpc-server
    bench_relay.py check --delay-ms D [--count N]   # ping-pong through both kinds; prints RTTs

``udp`` is NAT-like: every client address gets its own upstream socket
(bound to 127.0.0.1, connected to TARGET), so the node behind the relay sees
one peer address per client and its replies find their way back. Every
datagram, both ways, is delivered D ms after it arrived, in arrival order;
datagrams are forwarded unchanged (the relay never splits or joins them).
A datagram larger than ``--max-datagram`` (1452 B: a LAN's 1500-B MTU less
IPv6 and UDP headers) is dropped, as such a link would drop it, and counted
(qh3 sends one 1472-B short-header packet per connection: a path-MTU probe).

``tcp`` accepts connections on LISTEN and connects each to TARGET
(TCP_NODELAY on both sides); each chunk read, in either direction, is
written D ms after it arrived, in order; EOF is forwarded as a half-close
after the same delay. At most 64 MiB per direction wait in the relay (then it
stops reading: back-pressure, as a real link's buffers give).

Threads, not an event loop: epoll timeouts have millisecond granularity and
asyncio timers fire up to 1 ms late, which would double a 1 ms delay;
``time.sleep`` until each deadline is accurate to tens of µs. The threads
spend their time in blocking system calls (the GIL is free), and the switch
interval is lowered so a thread that holds it never delays a delivery by much.

On start the process prints one JSON line ``{"listen": "host:port"}`` to
stdout (the port is real when LISTEN asked for port 0); on SIGTERM it prints
``{"stats": …}`` (packets/chunks, bytes, largest datagram) and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

MAX_DATAGRAM = 65535
CHUNK = 256 * 1024
QUEUED_CHUNKS = 256  # × CHUNK = 64 MiB per direction

sys.setswitchinterval(0.0002)


def _tighten_timers() -> float:
    """Timer slack 1 ns (default 50 µs) for this process; the median oversleep it leaves."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    over = []
    for _ in range(50):
        t0 = time.perf_counter()
        time.sleep(0.0005)
        over.append(time.perf_counter() - t0 - 0.0005)
    return max(0.0, statistics.median(over))


OVERSLEEP = 0.0  # set in run_relay: each sleep is shortened by the measured oversleep


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


class Delayer:
    """One FIFO of (deadline, action): a thread runs each action at its deadline, in order."""

    def __init__(self, delay_s: float, maxsize: int = 0, name: str = "delayer") -> None:
        self.delay = delay_s
        self.q: queue.Queue[tuple[float, Callable[[], Any]] | None] = queue.Queue(maxsize)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, action: Callable[[], Any]) -> None:
        self.q.put((time.monotonic() + self.delay, action))

    def close(self) -> None:
        self.q.put(None)

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            deadline, action = item
            wait = deadline - time.monotonic() - OVERSLEEP
            if wait > 0:
                time.sleep(wait)
            with contextlib.suppress(OSError):
                action()


class UdpRelay:
    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        delay_s: float,
        max_datagram: int = 1452,
    ) -> None:
        self.target = target
        self.limit = max_datagram
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.front.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.front.bind(listen)
        self.upstream: dict[tuple[str, int], socket.socket] = {}
        self.to_target = Delayer(delay_s, name="to-target")
        self.to_client = Delayer(delay_s, name="to-client")
        self.stats: dict[str, Any] = {
            "datagrams": 0,
            "bytes": 0,
            "max_datagram": 0,
            "dropped": 0,
            "dropped_size_first_byte": [],
            "flows": 0,
        }
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        host, port = self.front.getsockname()[:2]
        return f"{host}:{port}"

    def _count(self, data: bytes) -> bool:
        """Count a datagram; False: too big for the link, drop it."""
        n = len(data)
        with self.lock:
            if n > self.limit:
                self.stats["dropped"] += 1
                if len(self.stats["dropped_size_first_byte"]) < 8:  # what kind of packet
                    self.stats["dropped_size_first_byte"].append(f"{n}:{data[0]:02x}")
                return False
            self.stats["datagrams"] += 1
            self.stats["bytes"] += n
            if n > 1452:  # forwarded only with --max-datagram above a LAN's limit
                self.stats["forwarded_over_1452"] = self.stats.get("forwarded_over_1452", 0) + 1
            if n > self.stats["max_datagram"]:
                self.stats["max_datagram"] = n
            return True

    def serve(self) -> None:
        while True:
            data, client = self.front.recvfrom(MAX_DATAGRAM)
            if not self._count(data):
                continue
            up = self.upstream.get(client)
            if up is None:
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                up.bind(("127.0.0.1", 0))
                up.connect(self.target)
                self.upstream[client] = up
                self.stats["flows"] += 1
                threading.Thread(target=self._back, args=(up, client), daemon=True).start()
            self.to_target.put(functools.partial(up.send, data))

    def _back(self, up: socket.socket, client: tuple[str, int]) -> None:
        while True:
            try:
                data = up.recv(MAX_DATAGRAM)
            except ConnectionRefusedError:  # the node is not (yet, or any more) there
                continue
            except OSError:
                return
            if not self._count(data):
                continue
            self.to_client.put(functools.partial(self.front.sendto, data, client))


class TcpRelay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
        self.target = target
        self.delay = delay_s
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(listen)
        self.lsock.listen(16)
        self.stats = {"connections": 0, "chunks": 0, "bytes_to_target": 0, "bytes_to_client": 0}
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        host, port = self.lsock.getsockname()[:2]
        return f"{host}:{port}"

    def serve(self) -> None:
        while True:
            client, _ = self.lsock.accept()
            try:
                up = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            up.settimeout(None)
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats["connections"] += 1
            self._pipe(client, up, "bytes_to_target")
            self._pipe(up, client, "bytes_to_client")

    def _pipe(self, src: socket.socket, dst: socket.socket, key: str) -> None:
        out = Delayer(self.delay, QUEUED_CHUNKS, name=key)

        def shut() -> None:
            dst.shutdown(socket.SHUT_WR)

        def read() -> None:
            try:
                while True:
                    data = src.recv(CHUNK)
                    if not data:
                        break
                    with self.lock:
                        self.stats["chunks"] += 1
                        self.stats[key] += len(data)
                    out.put(functools.partial(dst.sendall, data))
            except OSError:
                pass
            out.put(shut)
            out.close()

        threading.Thread(target=read, daemon=True).start()


def run_relay(
    kind: str, listen: str, target: str, delay_ms: float, max_datagram: int = 1452
) -> int:
    global OVERSLEEP
    OVERSLEEP = _tighten_timers()
    relay: UdpRelay | TcpRelay
    if kind == "udp":
        relay = UdpRelay(split_addr(listen), split_addr(target), delay_ms / 1000, max_datagram)
    else:
        relay = TcpRelay(split_addr(listen), split_addr(target), delay_ms / 1000)
    print(json.dumps({"listen": relay.address, "kind": kind, "delay_ms": delay_ms}), flush=True)

    def done(_sig: int, _frm: object) -> None:
        print(json.dumps({"stats": relay.stats}), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, done)
    threading.Thread(target=relay.serve, daemon=True).start()
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------------- check
def start_relay(
    kind: str, listen: str, target: str, delay_ms: float, max_datagram: int = 1452
) -> tuple[Any, str]:
    """Start a relay process; (Popen, its listen address)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, kind, listen, target, "--delay-ms", str(delay_ms),
         "--max-datagram", str(max_datagram)],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"{kind} relay {listen} -> {target} did not start")
    return proc, json.loads(line)["listen"]


def stop_relay(proc: Any, timeout: float = 5.0) -> dict[str, Any]:
    """SIGTERM a relay started by ``start_relay``; its stats."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    for line in (out or b"").decode().splitlines():
        if line.startswith('{"stats"'):
            return json.loads(line)["stats"]  # type: ignore[no-any-return]
    return {}


def _udp_echo(sock: socket.socket) -> None:
    while True:
        try:
            data, addr = sock.recvfrom(MAX_DATAGRAM)
            sock.sendto(data, addr)
        except OSError:
            return


def _tcp_echo(lsock: socket.socket) -> None:
    try:
        conn, _ = lsock.accept()
    except OSError:
        return
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)


def ping_pong(delay_ms: float, count: int = 200, size: int = 1200) -> dict[str, Any]:
    """Round trips of ``size``-byte messages, direct and through one relay of each kind.

    One relay on the path delays both directions, so a round trip through it
    should take the direct time + 2 × the delay; returns p50/p99 µs and the
    one-way delay it implies ((relay p50 − direct p50) / 2)."""
    out: dict[str, Any] = {"delay_ms": delay_ms}
    udp_echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_echo.bind(("127.0.0.1", 0))
    threading.Thread(target=_udp_echo, args=(udp_echo,), daemon=True).start()
    target = f"127.0.0.1:{udp_echo.getsockname()[1]}"
    proc, relay = start_relay("udp", "127.0.0.1:0", target, delay_ms)
    try:
        for name, addr in (("udp_direct", target), ("udp_relay", relay)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(split_addr(addr))
            s.settimeout(2)
            payload = b"x" * size
            rtts = []
            for i in range(count + 5):
                t0 = time.perf_counter()
                s.send(payload)
                s.recv(MAX_DATAGRAM)
                if i >= 5:
                    rtts.append(time.perf_counter() - t0)
            s.close()
            out[name] = _summary(rtts)
    finally:
        stats = stop_relay(proc)
        udp_echo.close()
    out["udp_max_datagram"] = stats.get("max_datagram")
    for name in ("tcp_direct", "tcp_relay"):
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        threading.Thread(target=_tcp_echo, args=(lsock,), daemon=True).start()
        target = f"127.0.0.1:{lsock.getsockname()[1]}"
        proc = None
        addr = target
        if name == "tcp_relay":
            proc, addr = start_relay("tcp", "127.0.0.1:0", target, delay_ms)
        try:
            s = socket.create_connection(split_addr(addr))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = b"y" * size
            rtts = []
            for i in range(count + 5):
                t0 = time.perf_counter()
                s.sendall(payload)
                got = 0
                while got < size:
                    got += len(s.recv(65536))
                if i >= 5:
                    rtts.append(time.perf_counter() - t0)
            s.close()
            out[name] = _summary(rtts)
        finally:
            if proc is not None:
                stop_relay(proc)
            lsock.close()
    for kind in ("udp", "tcp"):
        added = out[f"{kind}_relay"]["p50_us"] - out[f"{kind}_direct"]["p50_us"]
        out[f"{kind}_one_way_ms"] = round(added / 2 / 1000, 3)
    return out


def _summary(rtts: list[float]) -> dict[str, float]:
    us = sorted(r * 1e6 for r in rtts)
    return {"p50_us": round(statistics.median(us), 1), "p99_us": round(us[int(len(us) * 0.99)], 1)}


def describe_check(r: dict[str, Any]) -> str:
    return (
        f"relay check, {r['delay_ms']:g} ms: UDP round trip p50 "
        f"{r['udp_relay']['p50_us'] / 1e3:.2f} ms "
        f"(direct {r['udp_direct']['p50_us'] / 1e3:.3f}) -> one way +{r['udp_one_way_ms']:.2f} ms, "
        f"largest datagram {r['udp_max_datagram']} B; TCP round trip p50 "
        f"{r['tcp_relay']['p50_us'] / 1e3:.2f} ms (direct {r['tcp_direct']['p50_us'] / 1e3:.3f}) "
        f"-> one way +{r['tcp_one_way_ms']:.2f} ms"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("kind", choices=["udp", "tcp", "check"])
    ap.add_argument("listen", nargs="?", default="127.0.0.1:0")
    ap.add_argument("target", nargs="?")
    ap.add_argument("--delay-ms", type=float, default=1.0)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument(
        "--max-datagram", type=int, default=1452, help="udp: drop larger datagrams (default 1452)"
    )
    args = ap.parse_args()
    if args.kind == "check":
        r = ping_pong(args.delay_ms, args.count)
        print(describe_check(r))
        print(json.dumps(r))
        return 0
    if not args.target:
        ap.error("udp/tcp need LISTEN and TARGET")
    return run_relay(args.kind, args.listen, args.target, args.delay_ms, args.max_datagram)


if __name__ == "__main__":
    raise SystemExit(main())
