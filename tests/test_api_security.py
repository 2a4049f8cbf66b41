"""Who may reach what: peers' Tasks, Host/Origin checks, JSON-only POSTs, the console login.

Real aiohttp servers on 127.0.0.1 (port 0) and real HTTP requests; peers'
Tasks go over a real TCP stream through the DCF proxy to the node's Task
handler, with no HTTP gateway running at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from yarl import URL

from mesh_inference.api.console import add_model_routes
from mesh_inference.api.gateway import create_app
from mesh_inference.api.openai import make_task_handler
from mesh_inference.api.security import host_allowed, own_host_names, same_origin, split_host
from mesh_inference.cli.main import cli
from mesh_inference.core.identity import IdentityError
from mesh_inference.machine.state import (
    CONSOLE_TOKEN_FILE,
    load_or_create_console_token,
    read_console_token,
)
from mesh_inference.net.proxy import forward_request, serve_task

pytestmark = pytest.mark.timeout(60)
TOKEN = "Ab0_" + "x" * 39
JOIN = "mi1.the-mesh-secret"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
CONSOLE = Path(__file__).resolve().parent.parent / "console"


class Backend:
    """The node, as the gateway, the Task handler and the model routes see it; counts calls."""

    def __init__(self, engine_url: str | None = None, models_dir: Path = Path("/nonexistent")):
        self.engine = engine_url
        self._models_dir = models_dir
        self.status_calls = 0
        self.switched: list[str] = []
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def status(self) -> dict[str, Any]:
        self.status_calls += 1
        return {"ready": True, "engine": {"state": "ready"}, "join_token": JOIN, "node": {}}

    def engine_url(self) -> str | None:
        return self.engine

    def is_host(self) -> bool:
        return True

    def served_model(self) -> str | None:
        return "m"

    async def open_host_stream(self) -> tuple[Any, Any]:
        raise AssertionError("this node is the host")

    async def _sub(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "status", self.status()
        while True:
            yield await self.queue.get()

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self._sub()

    def models_dir(self) -> Path:
        return self._models_dir

    def current_model(self) -> str | None:
        return "m"

    async def switch_model(self, ref: str) -> None:
        self.switched.append(ref)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        pass


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)  # as the node runs it
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def engine() -> AsyncIterator[tuple[str, list[str]]]:
    """A stand-in for llama-server that records the paths it was asked for."""
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.path)
        body = await request.json()
        return web.json_response({"choices": [{"message": {"content": "Paris."}}],
                                  "echo": body["messages"][0]["content"]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner, url = await serve(app)
    yield url, seen
    await runner.cleanup()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, Backend]]:
    backend = Backend(models_dir=tmp_path / "models")
    app = create_app(backend, console_dir=CONSOLE,
                     console_token=TOKEN, allowed_hosts=["mesh.example.lan"])
    add_model_routes(app, backend)
    runner, url = await serve(app)
    yield url, backend
    await runner.cleanup()


# ---------------------------------------------------------------- peers' Tasks
@pytest.fixture
async def task_peer(
    engine: tuple[str, list[str]],
) -> AsyncIterator[tuple[Callable[..., Awaitable[tuple[int, Any]]], Backend]]:
    """A 'host' that serves Tasks from a real TCP stream with the node's handler."""
    backend = Backend(engine_url=engine[0])
    session = aiohttp.ClientSession()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_task(reader, writer, make_task_handler(backend, session))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def task(method: str, path: str, body: bytes = b"",
                   content_type: str = "application/json") -> tuple[int, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        resp = await forward_request(reader, writer, method=method, path=path,
                                     headers={"content-type": content_type}, body=body)
        data = b"".join([c async for c in resp.body_iter])
        return resp.status, json.loads(data)

    yield task, backend
    server.close()
    await session.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/status"),
        ("GET", "/api/events"),
        ("POST", "/api/models/switch"),
        ("POST", "/api/models/download"),
        ("POST", "/api/login"),
        ("GET", "/"),
        ("GET", "/index.html"),
        ("GET", "/health"),
        ("POST", "/v1/nope"),
        ("GET", "/v1"),
        ("POST", "/v1/chat/completions/../../api/models/switch"),
    ],
)
async def test_task_reaches_only_the_openai_routes(task_peer: Any, method: str,
                                                   path: str) -> None:
    task, backend = task_peer
    code, body = await task(method, path, json.dumps({"ref": "other"}).encode())
    assert code == 404
    assert body["error"]["code"] == "not_found"
    assert backend.status_calls == 0 and backend.switched == []


async def test_task_chat_is_served_directly(task_peer: Any,
                                            engine: tuple[str, list[str]]) -> None:
    task, _ = task_peer
    code, body = await task("POST", "/v1/chat/completions", json.dumps(CHAT).encode())
    assert code == 200 and body["echo"] == "hi"
    assert engine[1] == ["/v1/chat/completions"]  # straight to the engine: no gateway runs


async def test_task_models_wrong_method_and_type(task_peer: Any) -> None:
    task, _ = task_peer
    code, body = await task("GET", "/v1/models")
    assert code == 200 and body["data"][0]["id"] == "m"
    code, body = await task("GET", "/v1/chat/completions")
    assert code == 405 and body["error"]["code"] == "method_not_allowed"
    code, body = await task("POST", "/v1/chat/completions", b"messages=hi",
                            "application/x-www-form-urlencoded")
    assert code == 415
    code, body = await task("POST", "/v1/chat/completions", b'{"messages": NaN}')
    assert code == 400 and body["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- Host and Origin
@pytest.mark.parametrize("path", ["/api/status", "/", "/v1/models", "/health"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "", "[::1", "a:b:c"])
async def test_rebinding_host_is_refused(gateway: tuple[str, Backend], path: str,
                                         host: str) -> None:
    url, backend = gateway
    async with aiohttp.ClientSession() as s, s.get(url + path, headers={"Host": host}) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "host_not_allowed"
    assert backend.status_calls == 0


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.4.5.6:9", "[::1]:9337",
                                  "LOCALHOST.", "mesh.example.lan:9337"])
async def test_loopback_and_configured_hosts_are_served(gateway: tuple[str, Backend],
                                                        host: str) -> None:
    url, _ = gateway
    async with aiohttp.ClientSession() as s, s.get(url + "/health",
                                                   headers={"Host": host}) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", CHAT), ("/api/models/switch", {"ref": "x"}),
     ("/api/login", {"token": TOKEN})],
)
async def test_cross_origin_post_is_403(gateway: tuple[str, Backend], path: str,
                                        body: dict[str, Any]) -> None:
    url, backend = gateway
    headers = {"authorization": f"Bearer {TOKEN}", "origin": "http://evil.example"}
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body,
                                                    headers=headers) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "cross_origin"
    assert backend.switched == []


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "https://127.0.0.1:{port}",
                                    "http://127.0.0.1:1"])
@pytest.mark.parametrize("path", ["/api/status", "/api/events", "/api/models"])
async def test_cross_origin_status_and_events_are_403(gateway: tuple[str, Backend], path: str,
                                                      origin: str) -> None:
    url, _ = gateway
    origin = origin.format(port=URL(url).port)
    async with aiohttp.ClientSession() as s, s.get(url + path,
                                                   headers={"origin": origin}) as r:
        assert r.status == 403


async def test_same_origin_post_works(gateway: tuple[str, Backend]) -> None:
    url, backend = gateway
    headers = {"authorization": f"Bearer {TOKEN}", "origin": url}
    async with aiohttp.ClientSession() as s, s.post(f"{url}/api/models/switch",
                                                    json={"ref": "m2"}, headers=headers) as r:
        assert r.status == 202
    assert backend.switched == ["m2"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/models/switch", "/api/login"])
@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain",
                                   "multipart/form-data; boundary=x", None])
async def test_post_must_be_json(gateway: tuple[str, Backend], path: str,
                                 ctype: str | None) -> None:
    url, backend = gateway
    headers = {"authorization": f"Bearer {TOKEN}"}
    if ctype is not None:
        headers["content-type"] = ctype
    async with aiohttp.ClientSession() as s, s.post(url + path, data=b'{"ref": "x"}',
                                                    headers=headers) as r:
        assert r.status == 415
        assert (await r.json())["error"]["code"] == "unsupported_media_type"
    assert backend.switched == []


# ---------------------------------------------------------------- login and secrets
async def test_status_without_login_has_no_join_token(gateway: tuple[str, Backend]) -> None:
    url, backend = gateway
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/api/status") as r:
            data = await r.json()
            assert data["join_token"] is None and data["ready"] is True
        async with s.get(f"{url}/api/events") as r:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert JOIN.encode() not in first and b'"join_token": null' in first
            await backend.queue.put(("status", backend.status()))
            second = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
            assert JOIN.encode() not in second
        async with s.get(f"{url}/api/session") as r:
            assert await r.json() == {"authenticated": False}


@pytest.mark.parametrize("how", ["bearer", "query"])
async def test_status_with_token_has_join_token(gateway: tuple[str, Backend], how: str) -> None:
    url, _ = gateway
    headers = {"authorization": f"Bearer {TOKEN}"} if how == "bearer" else {}
    query = f"?token={TOKEN}" if how == "query" else ""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/api/status{query}", headers=headers) as r:
            assert (await r.json())["join_token"] == JOIN
        async with s.get(f"{url}/api/events{query}", headers=headers) as r:
            assert JOIN.encode() in await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)


async def test_login_url_sets_cookie_and_redirects(gateway: tuple[str, Backend]) -> None:
    url, _ = gateway
    jar = aiohttp.CookieJar(unsafe=True)  # unsafe: cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.get(f"{url}/?token={TOKEN}&x=1", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["location"] == "/?x=1"
            cookie = r.headers["set-cookie"]
            assert TOKEN in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert r.headers["referrer-policy"] == "no-referrer"
        async with s.get(f"{url}/api/status") as r:
            assert (await r.json())["join_token"] == JOIN
        async with s.get(f"{url}/api/session") as r:
            assert await r.json() == {"authenticated": True}
        async with s.get(f"{url}/") as r:
            assert r.status == 200 and "login-token" in await r.text()
        async with s.post(f"{url}/api/models/switch", json={"ref": "m3"}) as r:
            assert r.status == 202
        async with s.post(f"{url}/api/logout", json={}) as r:
            assert r.status == 200
        async with s.get(f"{url}/api/status") as r:
            assert (await r.json())["join_token"] is None


async def test_login_redirect_stays_on_this_site(gateway: tuple[str, Backend]) -> None:
    url, _ = gateway
    async with aiohttp.ClientSession() as s, s.get(
        URL(f"{url}//evil.example/?token={TOKEN}", encoded=True), allow_redirects=False
    ) as r:
        assert r.status == 302
        assert r.headers["location"].startswith("/") and not r.headers["location"].startswith(
            ("//", "/\\"))


async def test_pasted_token_login(gateway: tuple[str, Backend]) -> None:
    url, _ = gateway
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(f"{url}/api/login", json={"token": "nope" * 10}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_token"
        async with s.post(f"{url}/api/login", json={"token": 5}) as r:
            assert r.status == 400
        async with s.post(f"{url}/api/login", json={"token": TOKEN}) as r:
            assert r.status == 200 and "HttpOnly" in r.headers["set-cookie"]
        async with s.get(f"{url}/api/status") as r:
            assert (await r.json())["join_token"] == JOIN


@pytest.mark.parametrize("wrong", ["x" * 43, TOKEN[:-1], TOKEN + "x", "é" * 43])
async def test_wrong_token_is_401(gateway: tuple[str, Backend], wrong: str) -> None:
    url, backend = gateway
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/", params={"token": wrong}, allow_redirects=False) as r:
            assert r.status == 401 and "set-cookie" not in r.headers
        async with s.get(f"{url}/api/status",
                         headers={"authorization": f"Bearer {wrong}".encode().decode(
                             "latin-1")}) as r:
            assert r.status == 401
    assert backend.status_calls == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/models/switch"), ("POST", "/api/models/download"), ("GET", "/api/models"),
     ("GET", "/api/downloads"), ("GET", "/api/anything-new")],
)
async def test_model_routes_need_login(gateway: tuple[str, Backend], method: str,
                                       path: str) -> None:
    url, backend = gateway
    async with aiohttp.ClientSession() as s, s.request(method, url + path,
                                                       json={"ref": "m2"}) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "login_required"
    assert backend.switched == []


async def test_stale_cookie_is_not_logged_in(gateway: tuple[str, Backend]) -> None:
    url, _ = gateway
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(f"{url}/?token={TOKEN}", allow_redirects=False) as r:
            name = next(iter(r.cookies))
        s.cookie_jar.update_cookies({name: "y" * 43}, URL(url))
        async with s.get(f"{url}/api/status") as r:
            assert r.status == 200 and (await r.json())["join_token"] is None


async def test_v1_ignores_api_keys_and_console_pages_are_open(
    gateway: tuple[str, Backend],
) -> None:
    url, _ = gateway
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v1/models", headers={"authorization": "Bearer sk-x"}) as r:
            assert r.status == 200
        async with s.get(f"{url}/v1/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with s.get(f"{url}/") as r:
            assert r.status == 200
            assert r.headers["x-frame-options"] == "DENY"


# ---------------------------------------------------------------- the helpers
@pytest.mark.parametrize(
    ("value", "parsed"),
    [("localhost:9337", ("localhost", 9337)), ("[::1]:80", ("::1", 80)), ("[::1]", ("::1", None)),
     ("Example.COM.", ("example.com", None)), ("::1", None), ("a:0", None), ("a:x", None),
     ("[::1]x", None), ("", None)],
)
def test_split_host(value: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(value) == parsed


def test_host_and_origin_helpers() -> None:
    assert host_allowed("127.9.9.9:1", frozenset())
    assert host_allowed("[0:0:0:0:0:0:0:1]:1", frozenset())
    assert host_allowed("10.0.0.5:9337", frozenset({"10.0.0.5"}))
    assert not host_allowed("10.0.0.5:9337", frozenset())
    assert same_origin("http://127.0.0.1:9337", "127.0.0.1:9337", "http")
    assert same_origin("http://localhost", "localhost:80", "http")
    assert not same_origin("http://localhost:9337", "127.0.0.1:9337", "http")
    assert not same_origin("http://127.0.0.1:9337/x", "127.0.0.1:9337", "http")
    names = own_host_names("0.0.0.0", ["Proxy.Example."])
    assert "proxy.example" in names and "0.0.0.0" not in names


# ---------------------------------------------------------------- the token file
def test_console_token_file_is_private_from_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy_open(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    def no_chmod(*a: Any, **kw: Any) -> None:
        raise AssertionError("the token file must be created private, not chmod-ed later")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    state = tmp_path / "state"
    token = load_or_create_console_token(state)
    path = state / CONSOLE_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creates = [o for o in opened if o[1] & os.O_CREAT]
    assert creates and all(o[1] & os.O_EXCL and o[2] == 0o600 for o in creates)
    assert len(token) >= 43 and path.read_text().strip() == token
    assert load_or_create_console_token(state) == token  # kept across restarts
    assert read_console_token(state) == token


def test_console_token_file_errors(tmp_path: Path) -> None:
    assert read_console_token(tmp_path) is None
    (tmp_path / CONSOLE_TOKEN_FILE).write_text("short\n")
    with pytest.raises(IdentityError, match="console-token"):
        load_or_create_console_token(tmp_path)
    assert read_console_token(tmp_path) is None


# ---------------------------------------------------------------- `mesh-inference status`
async def test_cli_status_sends_the_token_only_to_its_own_node(
    gateway: tuple[str, Backend], tmp_path: Path
) -> None:
    url, _ = gateway
    state = tmp_path / "state"
    state.mkdir()
    (state / "node.json").write_text(json.dumps({"http_url": url}))
    (state / CONSOLE_TOKEN_FILE).write_text(TOKEN + "\n")

    def run(*args: str) -> dict[str, Any]:
        result = CliRunner().invoke(cli, ["status", "--json", "--state-dir", str(state), *args])
        assert result.exit_code == 0, result.output
        data: dict[str, Any] = json.loads(result.output)
        return data

    assert (await asyncio.to_thread(run))["join_token"] == JOIN
    assert (await asyncio.to_thread(run, "--url", url))["join_token"] is None
    (state / CONSOLE_TOKEN_FILE).write_text("z" * 43 + "\n")  # stale: still shows the status
    assert (await asyncio.to_thread(run))["join_token"] is None
