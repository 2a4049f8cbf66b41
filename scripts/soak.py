"""Soak: many chat requests through a worker's gateway while another worker is killed and restarted.

    .venv/bin/python scripts/soak.py [--requests 1000] [--concurrency 8] [--kills 1]

A real 3-node mesh on loopback (host a, workers b and c; the real engine with
``--threads 1`` and SmolLM2). Every request goes to **b**'s gateway (b forwards
it to the host over QUIC), half of them streamed. While they run, c is killed
with SIGKILL and, ``--down`` seconds later, restarted with the same state dir
(the same node id), ``--kills`` times, at evenly spaced points of the run.

Each request carries a unique marker, in its prompt and as ``x-request-id``,
and must get exactly one complete answer:

- streamed: HTTP 200, ``text/event-stream``, no error event, exactly one
  ``finish_reason`` and one ``data: [DONE]``, nothing after it;
- non-streamed: HTTP 200 and one JSON object with a choice that finished.

Counted as **answered**, **lost** (anything else: an error status or event, a
stream without its end, a broken connection) or **duplicated** (more than one
answer in one response: a second ``[DONE]`` or ``finish_reason``, two JSON
bodies, data after the end, or a continued stream whose text after the break
repeats what came before it). Streams that were continued across the kill
(the gateway's keep-alive comments mark the break) are asked again at the
end, when the mesh is calm, and compared with their calm answer (reported; at
temperature 0 they should match).

Memory: the RSS of the sidecars that live through the run (a and b), after a
warm-up and at the end, with psutil; growth must stay under ``--max-rss-growth``
(10 %). Exit status 0 only if nothing was lost or duplicated and the memory
held.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from mesh_inference.cli.devmesh import LocalMesh, NodeProcess  # noqa: E402

TOPICS = ("the sea", "a forest", "the moon", "bread", "a river", "winter", "music", "a bridge")
KEEPALIVE = b": mesh-inference"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Outcome:
    index: int
    marker: str
    stream: bool
    verdict: str = "lost"  # answered | lost | duplicated
    status: int = 0
    seconds: float = 0.0
    text: str = ""
    detail: str = ""
    seams: list[int] = field(default_factory=list)  # text length where a break was bridged
    body: dict[str, Any] = field(default_factory=dict)


def request_body(index: int, marker: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    topic = TOPICS[index % len(TOPICS)]
    return {
        "messages": [{"role": "user", "content": f"[{marker}] Say one sentence about {topic}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def post(port: int, body: dict[str, Any], marker: str, timeout: float
         ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"content-type": "application/json", "x-request-id": marker})  # fmt: skip
    return conn, conn.getresponse()


def judge_stream(out: Outcome, resp: http.client.HTTPResponse) -> None:
    done = finishes = roles = 0
    after_done = errors = 0
    in_break = False
    for raw in resp:
        line = raw.rstrip(b"\r\n")
        if line.startswith(KEEPALIVE):
            if not in_break:
                out.seams.append(len(out.text))
            in_break = True
            continue
        if not line.startswith(b"data:"):
            continue
        in_break = False
        data = line[5:].strip()
        if done:
            after_done += 1
        if data == b"[DONE]":
            done += 1
            continue
        event = json.loads(data)
        if "error" in event:
            errors += 1
            out.detail = json.dumps(event["error"])[:300]
            continue
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if "role" in delta:
                roles += 1
            out.text += delta.get("content") or ""
            if choice.get("finish_reason") is not None:
                finishes += 1
    repeated = any(0 < s < len(out.text) and out.text[s:].startswith(out.text[:s])
                   for s in out.seams)  # fmt: skip
    if done > 1 or finishes > 1 or roles > 1 or after_done or repeated:
        out.verdict = "duplicated"
        out.detail = (f"[DONE]×{done} finish×{finishes} role×{roles} after-end {after_done} "
                      f"repeat-at-break {repeated}")  # fmt: skip
    elif errors or done != 1 or finishes != 1:
        out.verdict = "lost"
        out.detail = out.detail or f"[DONE]×{done} finish×{finishes}: the stream ended early"
    else:
        out.verdict = "answered"


def judge_json(out: Outcome, raw: bytes) -> None:
    objects: list[Any] = []
    text = raw.decode(errors="replace").strip()
    decoder = json.JSONDecoder()
    pos = 0
    try:
        while pos < len(text):
            obj, pos = decoder.raw_decode(text, pos)
            objects.append(obj)
            while pos < len(text) and text[pos].isspace():
                pos += 1
    except ValueError:
        out.verdict, out.detail = "lost", f"not JSON: {text[:200]!r}"
        return
    if len(objects) > 1:
        out.verdict, out.detail = "duplicated", f"{len(objects)} JSON bodies"
        return
    try:
        choice = objects[0]["choices"][0]
        out.text = choice["message"]["content"]
        assert choice["finish_reason"] is not None
    except (KeyError, IndexError, TypeError, AssertionError):
        out.verdict, out.detail = "lost", f"no finished choice: {text[:200]!r}"
        return
    out.verdict = "answered"


def one_request(port: int, index: int, stream: bool, max_tokens: int, timeout: float) -> Outcome:
    marker = f"soak-{index:05d}-{uuid.uuid4().hex[:8]}"
    out = Outcome(index, marker, stream, body=request_body(index, marker, stream, max_tokens))
    t0 = time.monotonic()
    conn = None
    try:
        conn, resp = post(port, out.body, marker, timeout)
        out.status = resp.status
        if resp.status != 200:
            out.verdict, out.detail = "lost", resp.read()[:300].decode(errors="replace")
        elif stream:
            if not resp.getheader("content-type", "").startswith("text/event-stream"):
                out.verdict, out.detail = "lost", "a stream was asked, not answered"
            else:
                judge_stream(out, resp)
        else:
            judge_json(out, resp.read())
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out.verdict, out.detail = "lost", repr(exc)[:300]
    finally:
        if conn is not None:
            conn.close()
    out.seconds = time.monotonic() - t0
    return out


def ask_again(port: int, o: Outcome, timeout: float) -> str | None:
    """The same request (same marker) on a calm mesh; its text, None if it failed."""
    body = dict(o.body, stream=True)
    again = Outcome(o.index, o.marker, True, body=body)
    try:
        conn, resp = post(port, body, o.marker, timeout)
        try:
            judge_stream(again, resp)
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return None
    return again.text if again.verdict == "answered" else None


def recheck(port: int, report: Report, max_tokens: int, timeout: float
            ) -> tuple[dict[str, int], tuple[int, int]]:  # fmt: skip
    """Continued streams vs a calm, uninterrupted answer to the same request. With 8
    requests batched together the engine is not bit-exact, so uninterrupted streams
    are asked again too, as a control."""
    counts = {"equal": 0, "after": 0, "before": 0}
    continued = [o for o in report.continued() if o.verdict == "answered"]
    for o in continued:
        calm = ask_again(port, o, timeout)
        if calm == o.text:
            counts["equal"] += 1
            continue
        calm = calm or ""
        diverge = next((i for i, (x, y) in enumerate(zip(o.text, calm, strict=False))
                        if x != y),
                       min(len(o.text), len(calm)))  # fmt: skip
        where = "after" if diverge >= o.seams[0] else "before"
        counts[where] += 1
        log(f"continued stream {o.marker} (break at {o.seams}) differs from a calm re-ask at "
            f"{diverge} ({where} the break):\n  continued: {o.text!r}\n  calm:      {calm!r}")
    plain = [o for o in report.outcomes if o.stream and not o.seams and o.verdict == "answered"]
    sample = plain[:: max(1, len(plain) // max(5, len(continued)))][: max(5, len(continued))]
    same = sum(1 for o in sample if ask_again(port, o, timeout) == o.text)
    return counts, (same, len(sample))


def sidecar_rss(node: NodeProcess) -> int:
    return int(psutil.Process(node.proc.pid).memory_info().rss)


def settled_rss(nodes: dict[str, NodeProcess], timeout: float = 30.0) -> dict[str, int]:
    """The sidecars' RSS once it holds still (within 1 % for 2 s): an engine (re)load
    inflates it for a few seconds (measured: +30 MiB on the host, gone 2 s later)."""
    samples: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout
    while True:
        samples.append({k: sidecar_rss(n) for k, n in nodes.items()})
        last = samples[-5:]
        steady = len(last) == 5 and all(
            max(x[k] for x in last) <= 1.01 * min(x[k] for x in last) for k in nodes)
        if steady or time.monotonic() > deadline:
            return samples[-1]
        time.sleep(0.5)


@dataclass
class Report:
    requests: int
    concurrency: int
    outcomes: list[Outcome]
    kills: list[dict[str, float]]
    rss: dict[str, tuple[int, int]]  # sidecar → (after warm-up, end) bytes
    wall: float
    # Continued streams asked again on a calm mesh: equal / differ before the break (so not
    # because of it) / differ after it; and a control group of uninterrupted streams.
    recheck: dict[str, int] = field(default_factory=dict)
    control: tuple[int, int] = (0, 0)  # uninterrupted streams equal to a calm re-ask / asked

    def count(self, verdict: str) -> int:
        return sum(1 for o in self.outcomes if o.verdict == verdict)

    def growth(self) -> dict[str, float]:
        return {k: (end - start) / start for k, (start, end) in self.rss.items()}

    def continued(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.seams]

    def ok(self, max_growth: float) -> bool:
        return (self.count("lost") == 0 and self.count("duplicated") == 0
                and all(g < max_growth for g in self.growth().values()))  # fmt: skip

    def summary(self) -> str:
        secs = sorted(o.seconds for o in self.outcomes)
        p95 = secs[int(0.95 * (len(secs) - 1))] if secs else 0.0
        rss = ", ".join(
            f"{k} {a / 2**20:.1f} → {b / 2**20:.1f} MiB ({g:+.1%})"
            for (k, (a, b)), g in zip(self.rss.items(), self.growth().values(), strict=True)
        )
        kills = "; ".join(f"killed at {k['killed']:.0f} s, restarted at {k['restarted']:.0f} s"
                          for k in self.kills)  # fmt: skip
        return "\n".join([
            f"requests {self.requests} ({self.concurrency} concurrent, half streamed) "
            f"through worker b's gateway in {self.wall:.0f} s",
            f"answered {self.count('answered')}, lost {self.count('lost')}, "
            f"duplicated {self.count('duplicated')}",
            f"latency p50 {statistics.median(secs) if secs else 0:.2f} s, p95 {p95:.2f} s, "
            f"max {secs[-1] if secs else 0:.2f} s",
            f"worker c: {kills}",
            f"streams continued across a break: {len(self.continued())}; asked again on a calm "
            f"mesh: {self.recheck.get('equal', 0)} equal, {self.recheck.get('after', 0)} differ "
            f"after the break, {self.recheck.get('before', 0)} differ before it (control: "
            f"{self.control[0]}/{self.control[1]} uninterrupted streams equal)",
            f"sidecar RSS after warm-up → end: {rss}",
        ])  # fmt: skip


def run(
    root: Path, *, requests: int = 1000, concurrency: int = 8, kills: int = 1, down: float = 5.0,
    max_tokens: int = 24, request_wait: float = 30.0, warmup: int | None = None,
    timeout: float = 300.0,
) -> Report:  # fmt: skip
    """Start the mesh, soak it, stop it; the report."""
    lm = LocalMesh(root, extra_args=["--threads", "1", "--request-wait", str(request_wait)])
    try:
        a = lm.start_node("a", model="smollm2-135m", max_vram_gb=4)
        token = lm.join_token(a)
        b = lm.start_node("b", join=token, max_vram_gb=2)
        c = lm.start_node("c", join=token, max_vram_gb=1)
        lm.wait_for(b, lambda s: s["ready"] and len(s["plan"]["order"]) == 3, timeout=300,
                    what="engine ready on 3 nodes")  # fmt: skip
        c_id = c.status()["node"]["id"]
        log(f"mesh ready: host a, workers b (gateway, port {b.http_port}) and c (victim {c_id})")
        warm = concurrency * 2 if warmup is None else warmup
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda i: one_request(b.http_port, -1 - i, i % 2 == 0, max_tokens,
                                                timeout), range(warm)))  # fmt: skip
        start_rss = settled_rss({"a": a, "b": b})
        log(f"warm-up of {warm} requests done; RSS a {start_rss['a'] / 2**20:.1f} MiB, "
            f"b {start_rss['b'] / 2**20:.1f} MiB")  # fmt: skip

        sent = 0  # requests sent so far (the chaos thread kills at given counts)
        kill_log: list[dict[str, float]] = []
        stop = threading.Event()
        t_run = time.monotonic()

        def chaos() -> None:
            nonlocal c
            for k in range(kills):
                due = requests * (k + 1) // (kills + 1)
                while sent < due:
                    if stop.wait(0.05):
                        return
                t = time.monotonic()
                c.kill(signal.SIGKILL)
                log(f"killed worker c (SIGKILL) after {sent} requests were sent")
                if stop.wait(down):
                    return
                c = lm.restart_node(c, join=lm.join_token(a))
                same = c.status()["node"]["id"] == c_id
                log(f"restarted worker c after {down:.0f} s: pid {c.proc.pid}, "
                    f"{'same' if same else 'NEW'} node id")  # fmt: skip
                kill_log.append({"killed": t - t_run, "restarted": time.monotonic() - t_run})

        chaos_thread = threading.Thread(target=chaos, name="chaos", daemon=True)
        chaos_thread.start()
        done = 0
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def task(i: int) -> Outcome:
            nonlocal done, sent
            with lock:
                sent += 1
            out = one_request(b.http_port, i, i % 2 == 0, max_tokens, timeout)
            with lock:
                done += 1
                if out.verdict != "answered":
                    log(f"request {i} {out.verdict}: {out.status} {out.detail}")
                if done % 100 == 0:
                    log(f"{done}/{requests} done")
            return out

        with ThreadPoolExecutor(concurrency) as pool:
            outcomes = list(pool.map(task, range(requests)))
        wall = time.monotonic() - t_run
        stop.set()
        chaos_thread.join(timeout=120)
        end_rss = settled_rss({"a": a, "b": b})
        rss = {k: (v, end_rss[k]) for k, v in start_rss.items()}
        report = Report(requests, concurrency, outcomes, kill_log, rss, wall)
        report.recheck, report.control = recheck(b.http_port, report, max_tokens, timeout)
        return report
    finally:
        lm.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: the nodes are stopped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kills", type=int, default=1, help="kill/restart cycles of worker c")
    ap.add_argument("--down", type=float, default=5.0, help="seconds c stays dead")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--request-wait", type=float, default=30.0)
    ap.add_argument("--max-rss-growth", type=float, default=0.10)
    ap.add_argument("--state", type=Path, help="state dirs (default: a temporary directory)")
    ap.add_argument("--json", type=Path, help="write the outcomes here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        report = run(args.state or Path(tmp), requests=args.requests,
                     concurrency=args.concurrency, kills=args.kills, down=args.down,
                     max_tokens=args.max_tokens, request_wait=args.request_wait)  # fmt: skip
    print("\n" + report.summary(), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "summary": report.summary(),
            "outcomes": [{k: v for k, v in vars(o).items() if k != "body"}
                         for o in report.outcomes],
        }, indent=1))  # fmt: skip
    ok = report.ok(args.max_rss_growth)
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
