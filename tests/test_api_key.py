"""``--api-key``: Bearer auth on ``/v1/*`` at the HTTP edge; a public bind needs a key.

Real aiohttp servers on 127.0.0.1 (port 0) and real HTTP requests; the host
side of a worker's request is the host's Task handler behind the DCF proxy
over a real TCP stream (no key there: peers proved the mesh secret). The CLI
runs as a real process; the console runs in real Chromium (Playwright).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from gatewaymesh import start, task_server

from mesh_inference.api.gateway import NoHostError, create_app
from mesh_inference.api.security import AccessPolicy, public_bind_problem
from mesh_inference.cli.main import cli
from mesh_inference.node import Node, NodeConfig

pytestmark = pytest.mark.timeout(120)
TOKEN = "Ab0_" + "x" * 39  # the console login token
KEY = "sk-mesh-0123456789abcdef"
CHAT = {"messages": [{"role": "user", "content": "capital of France?"}]}
CONSOLE = Path(__file__).resolve().parent.parent / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent


def fake_llama(seen: list[dict[str, Any]]) -> web.Application:
    """Speaks like llama-server (JSON, or SSE when asked); records what reached it."""
    app = web.Application()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append({"auth": request.headers.get("authorization"), "body": body})
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Paris."},
                 "finish_reason": "stop"}]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for word in ["The ", "capital ", "is ", "Paris."]:
            chunk = {"object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app.router.add_post("/v1/chat/completions", chat)
    return app


class Backend:
    def __init__(self, engine: str | None, opener: Any = None) -> None:
        self.engine, self.opener = engine, opener

    def status(self) -> dict[str, Any]:
        return {"ready": True, "engine": {"state": "ready"}, "join_token": "mi1.secret",
                "node": {"id": "x", "name": "n", "role": "member"}, "peers": [],
                "plan": {"state": "ready", "order": []}}

    def engine_url(self) -> str | None:
        return self.engine

    def is_host(self) -> bool:
        return self.opener is None

    def served_model(self) -> str | None:
        return "smollm2-135m"

    async def open_host_stream(self) -> tuple[Any, Any]:
        if self.opener is None:
            raise NoHostError("no host")
        return await self.opener()  # type: ignore[no-any-return]

    async def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        yield "status", self.status()
        await asyncio.Event().wait()


@pytest.fixture
async def mesh() -> AsyncIterator[dict[str, Any]]:
    """fake llama ← host gateway (its own key); ← Task handler ← TCP ← worker gateway (KEY)."""
    seen: list[dict[str, Any]] = []
    r1, llama_url = await start(fake_llama(seen))
    host_backend = Backend(llama_url)
    r2, host_url = await start(create_app(host_backend, console_dir=None, console_token=TOKEN,
                                          api_key="the-host-has-another-key"))
    async with task_server(host_backend) as opener:
        r3, worker_url = await start(create_app(Backend(None, opener), console_dir=None,
                                                console_token=TOKEN, api_key=KEY))
        r4, open_url = await start(create_app(Backend(llama_url), console_dir=None,
                                              console_token=TOKEN))
        yield {"host": host_url, "worker": worker_url, "open": open_url, "seen": seen}
    for r in (r4, r3, r2, r1):
        await r.cleanup()


async def call(url: str, auth: str | None = None, method: str = "POST",
               body: Any = CHAT) -> tuple[int, Any, Any]:
    headers = {"authorization": auth} if auth is not None else {}
    async with aiohttp.ClientSession() as s, s.request(
        method, url, json=body if method == "POST" else None, headers=headers
    ) as r:
        data = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, data, r.headers


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        (None, "needs an API key"),
        ("Bearer wrong-key", "incorrect API key"),
        (f"Bearer {KEY}x", "incorrect API key"),
        (f"Bearer {KEY[:-1]}", "incorrect API key"),
        (f"Basic {KEY}", "needs an API key"),
        (f"Bearer {TOKEN}", "incorrect API key"),  # the console login is not the API key
        ("Bearer ", "incorrect API key"),
    ],
)
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/chat/completions"),
                                              ("GET", "/v1/models"), ("POST", "/v1/nope")])
async def test_without_the_right_key_is_401(mesh: dict[str, Any], auth: str | None, says: str,
                                            method: str, path: str) -> None:
    status, data, headers = await call(mesh["worker"] + path, auth, method)
    assert status == 401
    assert headers["WWW-Authenticate"] == "Bearer"
    err = data["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")
    assert says in err["message"] and KEY not in err["message"]
    assert mesh["seen"] == []


async def test_with_the_key_the_request_goes_through_the_mesh(mesh: dict[str, Any]) -> None:
    for auth in (f"Bearer {KEY}", f"bearer   {KEY}  "):
        status, data, _ = await call(mesh["worker"] + "/v1/chat/completions", auth)
        assert status == 200, data
        assert data["choices"][0]["message"]["content"] == "Paris."
    status, data, _ = await call(mesh["worker"] + "/v1/models", f"Bearer {KEY}", "GET")
    assert status == 200 and data["data"][0]["id"] == "smollm2-135m"
    # The host's Task handler asked for no key (its own gateway has another one), and
    # the key went no further than the node that checked it.
    assert [s["auth"] for s in mesh["seen"]] == [None, None]


async def test_the_key_is_checked_before_the_body(mesh: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        mesh["worker"] + "/v1/chat/completions", data=b"{nope",
        headers={"content-type": "text/plain"},
    ) as r:
        assert r.status == 401  # not 415 or 400: a stranger learns nothing


async def test_console_login_does_not_open_the_api(mesh: dict[str, Any]) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(f"{mesh['worker']}/?token={TOKEN}", allow_redirects=False) as r:
            assert r.status == 302  # logged in: the cookie is set
        async with s.post(f"{mesh['worker']}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 401
        async with s.get(f"{mesh['worker']}/api/session") as r:
            assert await r.json() == {"authenticated": True, "api_key_required": True}


async def test_health_and_status_need_no_key(mesh: dict[str, Any]) -> None:
    status, data, _ = await call(mesh["worker"] + "/health", method="GET")
    assert status == 200 and data["status"] == "ok"
    # /api/status keeps the console-login rule: open without secrets, full with the login.
    status, data, _ = await call(mesh["worker"] + "/api/status", method="GET")
    assert status == 200 and data["join_token"] is None
    status, data, _ = await call(mesh["worker"] + "/api/status", f"Bearer {TOKEN}", "GET")
    assert status == 200 and data["join_token"] == "mi1.secret"
    status, data, _ = await call(mesh["worker"] + "/api/status", f"Bearer {KEY}", "GET")
    assert status == 401  # the API key is not the console login either


async def test_without_a_key_configured_the_api_is_open(mesh: dict[str, Any]) -> None:
    status, data, _ = await call(mesh["open"] + "/v1/chat/completions", "Bearer anything")
    assert status == 200, data
    status, data, _ = await call(mesh["open"] + "/api/session", method="GET")
    assert data == {"authenticated": False}
    assert mesh["seen"][0]["auth"] == "Bearer anything"  # not ours: passed on as before


async def test_the_comparison_is_constant_time(mesh: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # what security.py calls
    assert (await call(mesh["worker"] + "/v1/models", "Bearer nope", "GET"))[0] == 401
    assert (await call(mesh["worker"] + "/v1/models", f"Bearer {KEY}", "GET"))[0] == 200
    assert (b"nope", KEY.encode()) in calls and (KEY.encode(), KEY.encode()) in calls
    assert AccessPolicy(TOKEN, api_key=KEY).api_key_matches(KEY)
    assert not AccessPolicy(TOKEN, api_key=KEY).api_key_matches("\udcff" + KEY)  # no raise


async def test_undecodable_authorization_bytes_are_a_401(mesh: dict[str, Any]) -> None:
    port = int(mesh["worker"].rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer \xc3\x28\xff\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


@pytest.mark.parametrize("key", ["", "with space", "tab\tkey", "é" * 3, "x" * 513])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="visible ASCII"):
        AccessPolicy(TOKEN, api_key=key)


@pytest.mark.parametrize(
    ("host", "key", "insecure", "refused"),
    [
        ("127.0.0.1", None, False, False),
        ("127.0.0.2", None, False, False),
        ("::1", None, False, False),
        ("localhost", None, False, False),
        ("0.0.0.0", None, False, True),
        ("::", None, False, True),
        ("", None, False, True),
        ("192.168.1.20", None, False, True),
        ("my-box.example", None, False, True),
        ("0.0.0.0", KEY, False, False),
        ("0.0.0.0", None, True, False),
    ],
)
def test_public_bind_rule(host: str, key: str | None, insecure: bool, refused: bool) -> None:
    assert (public_bind_problem(host, key, insecure) is not None) == refused


# ---------------------------------------------------------------- the CLI
def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESH_INFERENCE_")}


def test_the_cli_refuses_a_public_bind_without_a_key(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh_inference", "--model", "smollm2-135m",
         "--http-host", "0.0.0.0", "--http-port", "0", "--quic-port", "0", "--no-mdns",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, env=_env(), cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--http-host 0.0.0.0 is not a loopback address" in proc.stderr
    assert "--api-key" in proc.stderr and "--insecure-public" in proc.stderr
    assert not (tmp_path / "state").exists()  # refused before touching anything


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, env=env)
    return result.exit_code, result.output


def _unknown_model(tmp_path: Path, *args: str) -> list[str]:
    # Past the bind check, the node stops at the model: no network is touched.
    return ["--model", "no-such-model-anywhere", "--models-dir", str(tmp_path / "m"),
            "--state-dir", str(tmp_path / "s"), "--no-mdns", "--http-port", "0",
            "--quic-port", "0", *args]


@pytest.mark.parametrize("host", ["::", "192.0.2.7", "my-box.example"])
def test_cli_refuses_other_public_hosts(tmp_path: Path, host: str) -> None:
    code, out = run(_unknown_model(tmp_path, "--http-host", host))
    assert code == 2 and "not a loopback address" in out and "--insecure-public" in out


def test_cli_accepts_a_public_bind_with_a_key_or_insecure_public(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, f"  {KEY}\n".encode())
    os.close(fd)
    for args, env in [
        (["--api-key", KEY], None),
        (["--api-key-file", str(key_file)], None),
        ([], {"MESH_INFERENCE_API_KEY": KEY}),
        (["--insecure-public"], None),
    ]:
        code, out = run(_unknown_model(tmp_path, "--http-host", "0.0.0.0", *args), env)
        assert code == 2 and "no-such-model-anywhere" in out, out  # got as far as the model
        assert "loopback" not in out and "chmod" not in out
    code, out = run(_unknown_model(tmp_path, "--http-host", "0.0.0.0", "--insecure-public"))
    assert "has no key (--insecure-public)" in out


def test_cli_key_flags_are_checked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    readable = tmp_path / "readable"
    readable.write_text(KEY)
    readable.chmod(0o644)
    code, out = run(_unknown_model(tmp_path, "--api-key", KEY, "--api-key-file", str(empty)))
    assert code == 2 and "give the API key once" in out
    code, out = run(_unknown_model(tmp_path, "--api-key-file", str(empty)))
    assert code == 2 and "--api-key-file" in out and "visible ASCII" in out
    code, out = run(_unknown_model(tmp_path, "--api-key-file", str(tmp_path / "missing")))
    assert code == 2 and "cannot read" in out
    code, out = run(_unknown_model(tmp_path, "--api-key", "has space"))
    assert code == 2 and "--api-key" in out and "visible ASCII" in out
    code, out = run(_unknown_model(tmp_path, "--api-key-file", str(readable)))
    assert stat.S_IMODE(readable.stat().st_mode) == 0o644
    assert "chmod 600" in out and "no-such-model-anywhere" in out
    code, out = run(_unknown_model(tmp_path, "--model-alias", " "))
    assert code == 2 and "--model-alias" in out


def test_help_lists_the_new_flags() -> None:
    code, out = run(["--help"])
    assert code == 0
    for flag in ("--api-key", "--api-key-file", "--insecure-public", "--model-alias",
                 "MESH_INFERENCE_API_KEY"):
        assert flag in out


async def test_the_node_itself_refuses_a_public_bind_without_a_key(tmp_path: Path) -> None:
    node = Node(NodeConfig(state_dir=tmp_path, http_host="0.0.0.0"))
    with pytest.raises(ValueError, match="not a loopback address"):
        await node.start()
    assert os.listdir(tmp_path) == []  # refused before creating any state


# ---------------------------------------------------------------- the console
class ServedInThread:
    """A gateway (with the console and an API key) and a fake llama-server, in a thread."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._runners: list[web.AppRunner] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> None:
        r1, llama_url = await start(fake_llama(self.seen))
        r2, self.url = await start(create_app(Backend(llama_url), console_dir=CONSOLE,
                                              console_token=TOKEN, api_key=KEY))
        self._runners = [r2, r1]

    async def _stop(self) -> None:
        for r in self._runners:
            await r.cleanup()

    def __enter__(self) -> ServedInThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (scripts/setup --test installs it as root)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()


@pytest.mark.browser
def test_console_asks_for_the_key_and_sends_it(browser: Any, tmp_path: Path) -> None:
    with ServedInThread() as served:
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        errors: list[str] = []
        # Chromium logs every 401 answer as a console error; those are expected here.
        page.on("console", lambda m: errors.append(m.text)
                if m.type == "error" and "401" not in m.text else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        auth: list[str | None] = []
        page.on("request", lambda r: auth.append(r.headers.get("authorization"))
                if r.url.endswith("/v1/chat/completions") else None)

        page.goto(f"{served.url}/?token={TOKEN}")  # the console login, as the CLI prints it
        page.click("button[data-view=chat]")
        page.wait_for_selector("#api-key-form", state="visible", timeout=15000)
        assert "--api-key" in page.locator("#api-key-form").inner_text()

        # Asked without a key: refused, and the console says why.
        page.fill("#prompt", "What is the capital of France?")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant .body.error", timeout=15000)
        assert "API key" in page.locator(".msg.assistant .body").last.inner_text()
        # A wrong key: asked again with it, refused, the form says so.
        page.fill("#api-key", "not-the-key")
        page.click("#api-key-save")
        page.wait_for_selector("#api-key-error:has-text('refused that API key')", timeout=15000)
        assert page.evaluate("sessionStorage.getItem('mesh-inference.api-key')") is None
        # The right key: the failed answer is asked again, and streams.
        page.fill("#api-key", KEY)
        page.click("#api-key-save")
        page.wait_for_selector(".msg.assistant .stats", timeout=15000)
        assert page.locator(".msg.assistant .body").last.inner_text() == "The capital is Paris."
        assert page.locator(".msg.assistant").count() == 1
        assert page.locator("#api-key-form").is_hidden()
        assert page.evaluate("sessionStorage.getItem('mesh-inference.api-key')") == KEY
        page.screenshot(path=str(tmp_path / "console-api-key.png"))

        # A second question carries the key from the start.
        page.fill("#prompt", "And of Italy?")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length == 2",
                               timeout=15000)
        assert auth == [None, "Bearer not-the-key", f"Bearer {KEY}", f"Bearer {KEY}"]
        assert [s["auth"] for s in served.seen] == [None, None]  # never passed on
        # The console's own routes kept the login cookie (the mesh view is live).
        assert page.evaluate("fetch('/api/status').then((r) => r.json())")["join_token"] \
            == "mi1.secret"
        ctx.close()
        assert errors == []
