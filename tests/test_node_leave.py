"""Graceful leave through in-process nodes: a peer's Task in flight is drained, new ones retried.

Two real nodes in one event loop (test_node_inprocess.py's set-up, stand-in
engine processes). A streamed answer asked at b's gateway is served by the
host a as a peer Task; a.stop() lets it finish, refuses new work with 503
(b's gateway then waits and retries, and is served by b once a has left),
and a's Goodbye makes b show a as ``left`` at once.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from ggufs import tiny_gguf
from test_node_inprocess import make_node, peer_entry, ready_with, until

pytestmark = pytest.mark.timeout(120)

TOKENS = 40


async def test_stop_drains_a_peer_task_then_says_goodbye(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_TOKEN_DELAY_S", "0.05")  # the engines' streams take 2 s
    model = tiny_gguf(tmp_path / "tiny.gguf")
    a = make_node(tmp_path, "a", 4, model_ref=str(model))
    await a.start()
    b = make_node(tmp_path, "b", 2, join=a.join_token)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS}
    try:
        await b.start()
        await until(lambda: ready_with(a, 2) and ready_with(b, 2), "a hosts over a and b")
        async with aiohttp.ClientSession() as http:
            resp = await http.post(f"{b.http_url}/v1/chat/completions",
                                   json={**body, "stream": True})  # fmt: skip
            assert resp.status == 200
            first = await resp.content.readline()
            assert first.startswith(b"data: ")
            # The answer is in flight at the host, as b's Task: a is asked to stop.
            stopping = asyncio.ensure_future(a.stop())
            await until(lambda: a._drain.closing, "a is draining")
            assert a._drain.active >= 1 and not stopping.done()
            async with http.post(f"{a.http_url}/v1/chat/completions", json=body) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "shutting_down"
            # A new request at b: a refuses its Task, b's gateway waits and retries, and
            # is served by b itself once a has left and b hosts.
            later = asyncio.ensure_future(http.post(f"{b.http_url}/v1/chat/completions",
                                                    json=body))  # fmt: skip
            rest = await resp.content.read()
            resp.release()
            await stopping
            events = [ln[6:] for ln in (first + rest).decode().splitlines()
                      if ln.startswith("data: ")]  # fmt: skip
            assert events[-1] == "[DONE]"
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                           for e in events[:-1])  # fmt: skip
            assert text.split() == [f"t{i}" for i in range(TOKENS)]  # whole, never resumed
            # Goodbye: b shows a as left, not dead, and re-plans around itself.
            await until(lambda: peer_entry(b, a.node_id)["status"] == "left", "b: a left")
            served = await later
            assert served.status == 200, await served.text()
            info = json.loads((await served.json())["choices"][0]["message"]["content"])
            assert len(info["rpc"]) == 1  # b's own engine, one device
            assert b.status()["host_id"] == b.node_id
    finally:
        await b.stop()
        await a.stop()
