"""Test plumbing shared by the gateway tests: real servers on 127.0.0.1, port 0.

    runner, url = await start(app)                 # an aiohttp app, as the node runs it
    async with task_server(host_backend) as opener:
        ...  # opener() -> (reader, writer): a "QUIC stream" to the host's Task handler

The host's side of a peer's Task stream is the OpenAI core behind the DCF proxy,
exactly as the node serves it; a TCP connection stands in for the QUIC stream
(same reader/writer interface).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from mesh_inference.api.openai import make_task_handler
from mesh_inference.net.proxy import serve_task

Opener = Callable[[], Awaitable[tuple[Any, Any]]]


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)  # as the node runs it
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@contextlib.asynccontextmanager
async def task_server(host_backend: Any) -> AsyncIterator[Opener]:
    """The host's Task handler on a TCP listener; yields how a worker opens a stream to it."""
    session = aiohttp.ClientSession()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_task(reader, writer, make_task_handler(host_backend, session))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def opener() -> tuple[Any, Any]:
        return await asyncio.open_connection("127.0.0.1", port)

    try:
        yield opener
    finally:
        server.close()
        await session.close()
