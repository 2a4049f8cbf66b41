"""A stand-in for llama.cpp, as real processes: an echo "rpc-server" and an HTTP "llama-server".

``python standin_engine.py rpc --port P`` listens on 127.0.0.1:P and
answers llama.cpp RPC HELLO commands (u8 command, u64 LE size, payload →
u64 LE size, reply), the framing the sidecars' RPC-aware tunnels parse.
``python standin_engine.py server --port P --rpc a:1,b:2 --split 0.2,0.8
--alias m`` first says HELLO through every --rpc endpoint and exits 1
unless each answers (as llama-server aborts when an rpc-server is
unreachable), then answers ``GET /health``, ``GET /metrics`` (a few
``llamacpp:`` metrics, as ``llama-server --metrics``) and ``POST
/v1/chat/completions`` with its own command line in the reply. Standard
library only, so it starts in a few tens of milliseconds; the in-process
node tests (test_node_inprocess.py) run it as their engine.

``rpc-server``/``llama-server`` take llama.cpp's own flags instead (``-H -p
-t -c`` and ``-m --rpc -ngl -ts --host --port -c -t --alias --metrics``), so
a ``--llama-bin`` directory of two one-line scripts makes a real CLI node run
the stand-in (test_graceful_leave.py). A request with ``"stream": true``
is answered as OpenAI SSE chunks, ``max_tokens`` of them (16 by default),
``$STANDIN_TOKEN_DELAY_S`` seconds apart: a request that stays in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

HELLO = 14
HELLO_REQUEST = bytes([HELLO]) + (24).to_bytes(8, "little") + bytes(24)
HELLO_REPLY = (28).to_bytes(8, "little") + bytes([3, 0, 0, 0]) + bytes(24)  # "version 3"


async def _rpc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while head := await reader.readexactly(9):
            payload = await reader.readexactly(int.from_bytes(head[1:], "little"))
            if head[0] != HELLO or len(payload) != 24:
                break  # as rpc-server does on anything it does not expect: hang up
            writer.write(HELLO_REPLY)
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    writer.close()


async def _greet(endpoint: str) -> None:
    host, port = endpoint.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    writer.write(HELLO_REQUEST)
    got = await asyncio.wait_for(reader.readexactly(len(HELLO_REPLY)), 5)
    if got != HELLO_REPLY:
        raise ConnectionError(f"{endpoint} answered {got!r}")
    writer.close()


async def _stream(writer: asyncio.StreamWriter, alias: str, n: int) -> None:
    """``n`` SSE chunks of one token each, then ``[DONE]`` (as llama-server streams)."""
    delay = float(os.environ.get("STANDIN_TOKEN_DELAY_S", "0"))
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                 b"cache-control: no-cache\r\nconnection: close\r\n\r\n")
    for i in range(n):
        chunk = {"object": "chat.completion.chunk", "model": alias, "choices": [
            {"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}
        writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await writer.drain()
        await asyncio.sleep(delay)
    end = {"object": "chat.completion.chunk", "model": alias,
           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    writer.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
    await writer.drain()
    writer.close()


async def _serve_http(args: argparse.Namespace) -> None:
    info = {"rpc": args.rpc.split(","), "split": [float(s) for s in args.split.split(",")],
            "alias": args.alias, "model": args.model}  # fmt: skip
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = json.loads(await reader.readexactly(length)) if length else {}
        if isinstance(request, dict) and request.get("stream") is True:
            served += 1
            await _stream(writer, args.alias, int(request.get("max_tokens") or 16))
            return
        ctype = b"application/json"
        if request_line.startswith("GET /health"):
            body = b'{"status":"ok"}'
        elif request_line.startswith("GET /metrics"):
            ctype = b"text/plain; version=0.0.4"
            body = (b"# HELP llamacpp:requests_served_total Completions answered.\n"
                    b"# TYPE llamacpp:requests_served_total counter\n"
                    b"llamacpp:requests_served_total %d\n"
                    b"# HELP llamacpp:kv_cache_usage_ratio KV-cache usage.\n"
                    b"# TYPE llamacpp:kv_cache_usage_ratio gauge\n"
                    b"llamacpp:kv_cache_usage_ratio 0.25\n" % served)
        else:
            served += 1
            body = json.dumps({"object": "chat.completion", "model": args.alias, "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": json.dumps(info)}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8},
            }).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (ctype, len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()


def _llama_cpp_flags(kind: str, argv: Sequence[str]) -> list[str]:
    """llama.cpp's own flags (as engine/backends.py BinaryBackend passes them) → ours."""
    p = argparse.ArgumentParser(prog=kind)
    p.add_argument("-p", "--port", type=int, required=True)
    p.add_argument("-t", "--threads", type=int)
    if kind == "rpc-server":
        p.add_argument("-H", "--host")
        p.add_argument("-c", "--cache", action="store_true")
        a = p.parse_args(argv)
        return ["rpc", "--port", str(a.port)]
    p.add_argument("-m", "--model", default="")
    p.add_argument("--rpc", default="")
    p.add_argument("-ngl", "--n-gpu-layers")
    p.add_argument("-ts", "--tensor-split", default="")
    p.add_argument("--host")
    p.add_argument("-c", "--ctx-size")
    p.add_argument("--alias", default="model")
    p.add_argument("--metrics", action="store_true")
    a = p.parse_args(argv)
    return ["server", "--port", str(a.port), "--rpc", a.rpc, "--split", a.tensor_split,
            "--alias", a.alias, "--model", a.model]  # fmt: skip


async def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("rpc-server", "llama-server"):
        argv = _llama_cpp_flags(argv[0], argv[1:])
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["rpc", "server"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rpc", default="")
    p.add_argument("--split", default="")
    p.add_argument("--alias", default="model")
    p.add_argument("--model", default="")
    args = p.parse_args(argv)
    if args.kind == "rpc":
        server = await asyncio.start_server(_rpc, "127.0.0.1", args.port)
        async with server:
            await server.serve_forever()
    for endpoint in args.rpc.split(","):
        try:
            await _greet(endpoint)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            # as ggml's RPC client: "Failed to connect to 127.0.0.1:PORT", then abort
            print(f"Failed to connect to {endpoint}: {exc}", file=sys.stderr)
            return 1
    await _serve_http(args)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
