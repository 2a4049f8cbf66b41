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
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
        if length:
            await reader.readexactly(length)
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


async def main(argv: Sequence[str]) -> int:
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
    try:
        for endpoint in args.rpc.split(","):
            await _greet(endpoint)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        print(f"rpc endpoint failed: {exc}", file=sys.stderr)
        return 1
    await _serve_http(args)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
