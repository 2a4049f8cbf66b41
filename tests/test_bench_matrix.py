"""scripts/bench's parts that can be checked quickly: the delaying relays (they really
delay, keep order, drop datagrams too big for a LAN, half-close TCP) and the report
(the markdown table and, when matplotlib is installed, the PNG). The matrix itself
starts real nodes and llama.cpp: it is run by hand (docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


relay = _load("bench_relay")
DELAY_MS = 20.0  # large against scheduling noise on a busy 2-core machine


def test_udp_relay_delays_each_way_keeps_order_and_drops_oversize() -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    proc, addr = relay.start_relay("udp", "127.0.0.1:0", f"127.0.0.1:{echo.getsockname()[1]}",
                                   DELAY_MS)  # fmt: skip
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    try:
        host, port = relay.split_addr(addr)
        t0 = time.monotonic()
        for i in range(20):
            client.sendto(i.to_bytes(2, "big") + b"x" * 1450, (host, port))  # 1452 B: passes
        client.sendto(b"y" * 1453, (host, port))  # too big for a LAN: dropped
        got, seen = [], None
        for _ in range(20):
            data, seen = echo.recvfrom(65535)
            got.append(int.from_bytes(data[:2], "big"))
            echo.sendto(data, seen)
        first_in = time.monotonic() - t0
        assert got == list(range(20))  # in order
        assert first_in >= DELAY_MS / 1000 * 0.95
        echo.settimeout(0.3)
        with pytest.raises(TimeoutError):
            echo.recvfrom(65535)
        back = [int.from_bytes(client.recv(65535)[:2], "big") for _ in range(20)]
        assert back == list(range(20))
        assert time.monotonic() - t0 >= 2 * DELAY_MS / 1000 * 0.95
    finally:
        stats = relay.stop_relay(proc)
        client.close()
        echo.close()
    assert stats["dropped"] == 1 and stats["max_datagram"] == 1452 and stats["flows"] == 1


def test_tcp_relay_delays_both_ways_and_forwards_half_close() -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    proc, addr = relay.start_relay("tcp", "127.0.0.1:0", f"127.0.0.1:{lsock.getsockname()[1]}",
                                   DELAY_MS)  # fmt: skip
    try:
        client = socket.create_connection(relay.split_addr(addr), timeout=5)
        server, _ = lsock.accept()
        server.settimeout(5)
        t0 = time.monotonic()
        client.sendall(b"ping" * 1000)
        client.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := server.recv(65536):  # ends at the forwarded half-close
            data += chunk
        assert data == b"ping" * 1000
        server.sendall(b"pong")
        server.close()
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
        assert reply == b"pong"
        assert time.monotonic() - t0 >= 2 * DELAY_MS / 1000 * 0.95
        client.close()
    finally:
        stats = relay.stop_relay(proc)
        lsock.close()
    assert stats["bytes_to_target"] == 4000 and stats["bytes_to_client"] == 4
    assert stats["connections"] == 1


def _cell(model: str, nodes: int, delay: float, k: float) -> dict[str, Any]:
    side = {"load_s": 1.0, "tok_s": 50.0, "agg_tok_s": 80.0, "ttft_s": 0.2,
            "worst_ttft_s": 1.5, "runs": [50.0]}  # fmt: skip
    mesh = {**side, "tok_s": 50.0 * k, "agg_tok_s": 80.0 * k, "rtt_ms": {"b": 2 * delay + 0.4},
            "tunnels_after_load": {"w": {"bytes_up": 400_000, "bytes_down": 20_000}}}  # fmt: skip
    return {"model": model, "nodes": nodes, "delay_ms": delay, "mesh": mesh, "direct": side}


def test_report_table_and_plot(tmp_path: Path) -> None:
    bench = _load("bench")
    cells = [_cell(m, n, d, 1 - d / 20) for m in ("smollm2", "random-1g") for n in (2, 3)
             for d in (0.0, 1.0, 5.0)]  # fmt: skip
    cells[0]["mesh"].update(idle={"max_rss_mb": 80.0, "max_cpu_pct": 1.0}, failover_s=3.0)
    table = bench.markdown_table(cells)
    lines = table.splitlines()
    assert len(lines) == 2 + len(cells)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| smollm2 | 2 | 5 | 1.00 / 1.00 | 1.00× | 0.42 | 50.0 / 37.5 | **0.75×**" in table
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhistory\n")
    png = tmp_path / "bench-matrix.png"
    machine = {"cpu": "test", "cores": "2"}
    bench.write_docs(cells, machine, [], ["--runs", "1"], "2026-01-01 00:00 UTC", 1.0, png, doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhistory\n")  # appended, history kept
    assert "## Matrix run 2026-01-01 00:00 UTC" in text and table in text
    assert "serving again in 3.00 s" in text and "](bench-matrix.png)" in text
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib (the 'bench' extra) is not installed")
    bench.plot(cells, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
