"""End to end: a stream that outlives a worker and then the host.

Real nodes (host a, workers b, c and d, a --client node), real QUIC, real
llama.cpp and SmolLM2. A 200-token temperature-0 answer is streamed from the
client node; c is killed (SIGKILL) mid-answer, then a. The stream must go on
to the end with no error, no gap and no repeat: its text equals the answer
the intact mesh gave to the same request. Four serving nodes, so that what
is left after both deaths is still a split (b and d): SmolLM2's answer at
temperature 0 is the same on 3- and 2-way splits, while the one-device
layout differs from them in floating-point detail (seen here: a different
story after ~120 tokens).
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_e2e_mesh import _engine_available

from mesh_inference.cli.devmesh import LocalMesh, NodeProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

STORY = {
    "messages": [
        {"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}
    ],
    "temperature": 0,
    "max_tokens": 200,
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    reason = _engine_available()
    if reason:
        pytest.skip(f"llama.cpp binaries not installed: {reason}")
    root: Path = tmp_path_factory.mktemp("resume")
    lm = LocalMesh(root, extra_args=["--threads", "1"])
    try:
        a = lm.start_node("a", model="smollm2-135m", max_vram_gb=4)
        token = lm.join_token(a)
        b = lm.start_node("b", join=token, max_vram_gb=2)
        c = lm.start_node("c", join=token, max_vram_gb=1)
        d = lm.start_node("d", join=token, max_vram_gb=1)
        client = lm.start_node("laptop", join=token, client=True)
        lm.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 4, timeout=300,
                    what="engine ready on 4 nodes")  # fmt: skip
        lm.wait_for(client, lambda s: s["ready"], timeout=60, what="client sees the host")
        yield {"lm": lm, "a": a, "b": b, "c": c, "d": d, "client": client}
    finally:
        lm.stop()


def _post(node: NodeProcess, body: dict[str, Any]) -> http.client.HTTPResponse:
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"content-type": "application/json"})  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return resp


def test_a_stream_survives_a_worker_and_then_the_host(mesh: dict[str, Any]) -> None:
    client: NodeProcess = mesh["client"]
    whole = json.loads(_post(client, STORY).read())
    expected = whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] >= 150, "a long answer, to cut twice"

    resp = _post(client, {**STORY, "stream": True})
    text, tokens, comments, events = "", 0, 0, []
    kills: dict[str, float] = {}
    text_at: dict[str, str] = {}
    resumed_at: dict[str, float] = {}
    for raw in resp:  # line by line, as they arrive
        line = raw.rstrip(b"\r\n")
        if line.startswith(b":"):
            comments += 1
            continue
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            events.append("[DONE]")
            break
        ev = json.loads(data)
        events.append(ev)
        assert "error" not in ev, ev
        delta = ev["choices"][0]["delta"].get("content") if ev["choices"] else None
        if not delta:
            continue
        text += delta
        tokens += 1
        now = time.monotonic()
        for name in list(kills):
            resumed_at.setdefault(name, now)
        if tokens == 30 and "c" not in kills:
            mesh["c"].kill(signal.SIGKILL)  # a worker dies mid-answer
            kills["c"], text_at["c"] = now, text
        elif tokens == 90 and "a" not in kills:
            mesh["a"].kill(signal.SIGKILL)  # then the host
            kills["a"], text_at["a"] = now, text
    assert events[-1] == "[DONE]"
    assert set(kills) == {"a", "c"}, f"the answer ended after {tokens} tokens"
    cut_at = {name: len(text_at[name]) for name in kills}
    assert text == expected, f"kills at characters {cut_at}"
    assert comments > 0  # keep-alives while the mesh re-formed
    ids = {ev["id"] for ev in events if isinstance(ev, dict)}
    assert len(ids) == 1
    gaps = {name: round(resumed_at[name] - kills[name], 2) for name in kills}
    print(f"\nstream resumed after: worker kill {gaps['c']} s, host kill {gaps['a']} s; "
          f"{tokens} tokens, {comments} keep-alives")  # fmt: skip
