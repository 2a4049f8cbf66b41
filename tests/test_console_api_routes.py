"""Model routes of the console on a real gateway (guard included), downloads from a fake hub.

The client logs in with the console token as a bearer, as `mesh-inference`'s
own tools do; what happens without it is in test_api_security.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fakehub import running_hub

from mesh_inference.api.console import add_model_routes
from mesh_inference.api.gateway import create_app

pytestmark = pytest.mark.timeout(60)
TOKEN = "console-token-for-tests-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "content-type": "application/json"}


class Backend:
    def __init__(self, models_dir: Path) -> None:
        self._dir = models_dir
        self.switched: list[str] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    def models_dir(self) -> Path:
        return self._dir

    def current_model(self) -> str | None:
        return "smollm2-135m"

    async def switch_model(self, ref: str) -> None:
        if ref == "bad":
            raise ValueError("model 'bad' is not downloaded on this node yet")
        self.switched.append(ref)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        self.events.append((event, data))
        self.changed.set()

    # the gateway's side of the node (not used by these routes)
    def status(self) -> dict[str, Any]:
        return {"ready": False, "join_token": "mi1.secret"}

    def engine_url(self) -> str | None:
        return None

    def is_host(self) -> bool:
        return False

    def served_model(self) -> str | None:
        return None

    async def open_host_stream(self) -> tuple[Any, Any]:
        raise AssertionError("not used")

    async def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "status", self.status()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, Backend]]:
    backend = Backend(tmp_path / "models")
    app = create_app(backend, console_dir=None, console_token=TOKEN)
    add_model_routes(app, backend)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", backend
    await runner.cleanup()


async def test_listing(server: tuple[str, Backend]) -> None:
    url, _ = server
    async with aiohttp.ClientSession(headers=AUTH) as s, s.get(f"{url}/api/models") as r:
        data = await r.json()
    assert data["current"] == "smollm2-135m"
    names = {m["name"]: m for m in data["catalog"]}
    assert "qwen2.5-0.5b" in names and names["qwen2.5-0.5b"]["local"] is False
    assert data["local"] == []


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"ref": 3}', b'{"ref": ""}'])
@pytest.mark.parametrize("path", ["/api/models/switch", "/api/models/download"])
async def test_bad_bodies_are_400(server: tuple[str, Backend], path: str, body: bytes) -> None:
    url, _ = server
    async with aiohttp.ClientSession(headers=AUTH) as s, s.post(
        url + path, data=body, headers=JSON
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_switch(server: tuple[str, Backend]) -> None:
    url, backend = server
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(f"{url}/api/models/switch", json={"ref": "smollm2-135m"}) as r:
            assert r.status == 202
        async with s.post(f"{url}/api/models/switch", json={"ref": "bad"}) as r:
            assert r.status == 400 and "not downloaded" in (await r.json())["error"]["message"]
    assert backend.switched == ["smollm2-135m"]


async def test_download_publishes_progress_and_refuses_twice(
    server: tuple[str, Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, backend = server
    with running_hub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        data = b"GGUF" + os.urandom(3 << 20)
        hub.add("owner/repo", "m.gguf", data)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.post(f"{url}/api/models/download",
                              json={"ref": "hf://owner/repo/m.gguf"}) as r:
                assert r.status == 202
            async with s.post(f"{url}/api/models/download",
                              json={"ref": "hf://owner/repo/m.gguf"}) as r:
                assert r.status == 409
            async with asyncio.timeout(30):
                while not any(e[1].get("done") for e in backend.events):
                    backend.changed.clear()
                    await backend.changed.wait()
            async with s.get(f"{url}/api/downloads") as r:
                assert (await r.json())["hf://owner/repo/m.gguf"]["done"] is True
    final = [e for e in backend.events if e[1].get("done")][-1][1]
    assert final["error"] is None and final["downloaded_bytes"] == len(data)
    assert (backend.models_dir() / "m.gguf").read_bytes() == data


async def test_download_of_a_local_file_is_400(server: tuple[str, Backend],
                                               tmp_path: Path) -> None:
    url, _ = server
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    async with aiohttp.ClientSession(headers=AUTH) as s, s.post(
        f"{url}/api/models/download", json={"ref": str(f)}
    ) as r:
        assert r.status == 400 and "nothing to download" in (await r.json())["error"]["message"]
