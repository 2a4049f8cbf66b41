"""The console in real Chromium (Playwright) against a real 3-node mesh on SmolLM2.

Screenshots go to the test's temp dir; with UPDATE_SCREENSHOTS=1 they replace
the ones in docs/ that the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakehub import running_hub

from mesh_inference.cli.devmesh import LocalMesh

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(900)]
DOCS = Path(__file__).resolve().parent.parent / "docs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from mesh_inference.engine.backends import EngineUnavailable, find_backend

    try:
        find_backend("bin")
    except EngineUnavailable as exc:
        pytest.skip(f"llama.cpp binaries not installed: {exc}")
    root = tmp_path_factory.mktemp("console")
    hub_cm = running_hub()
    hub = hub_cm.__enter__()
    # A small stand-in for a catalog model, served by a local fake hub.
    hub.add("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf",
            b"GGUF" + os.urandom(2 << 20))
    lm = LocalMesh(root, extra_args=["--threads", "1", "--models-dir", str(root / "models")],
                   extra_env={"HF_ENDPOINT": hub.url})
    try:
        a = lm.start_node("gaming-pc", model="smollm2-135m", max_vram_gb=8)
        token = lm.join_token(a)
        b = lm.start_node("mac-mini", join=token, max_vram_gb=4)
        c = lm.start_node("laptop", join=token, max_vram_gb=2)
        lm.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 3, timeout=300,
                    what="3-node mesh ready")
        yield {"lm": lm, "a": a, "b": b, "c": c, "hub": hub}
    finally:
        lm.stop()
        hub_cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
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


def test_console_end_to_end(mesh: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    shots = DOCS if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    a = mesh["a"]
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=a.url)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    # Not logged in: the login screen, and the status carries no secret.
    with urllib.request.urlopen(f"{a.url}/api/status", timeout=10) as resp:
        assert json.loads(resp.read())["join_token"] is None
    page.goto(a.url + "/")
    page.wait_for_selector("#login-token", state="visible", timeout=15000)
    assert "open the url printed by" in page.locator("#login").inner_text().lower()
    assert not page.locator(".tabs").is_visible()
    page.screenshot(path=str(shots / "console-login.png"))
    public = page.evaluate("fetch('/api/status').then((r) => r.json())")
    assert public["join_token"] is None and public["node"]["name"] == "gaming-pc"

    # The URL the CLI prints logs in and drops the token from the address bar.
    page.goto(a.console_url)
    assert "token=" not in page.url and page.url.startswith(a.url)

    # Mesh view: three nodes, the host marked, live over SSE.
    page.wait_for_selector(".conn.live", timeout=15000)
    page.wait_for_function("document.querySelectorAll('.card').length === 3", timeout=15000)
    host_cards = page.locator(".card.host")
    assert host_cards.count() == 1
    assert "gaming-pc" in host_cards.inner_text()
    assert "ready" in page.locator("#ready-pill").inner_text()
    page.screenshot(path=str(shots / "console-mesh.png"))

    # Chat: a streamed answer with tokens/s and time to first token.
    page.click("button[data-view=chat]")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .body.cursor", timeout=30000)  # streaming
    page.wait_for_selector(".msg.assistant .stats", timeout=120000)
    answer = page.locator(".msg.assistant .body").last.inner_text()
    assert answer.strip() and "⚠" not in answer
    assert "tok/s" in page.locator(".msg.assistant .stats").last.inner_text()
    page.screenshot(path=str(shots / "console-chat.png"))

    # Join: the copy button puts the token on the clipboard.
    page.click("button[data-view=join]")
    token = a.status()["join_token"]  # devmesh sends the console token: the full status
    assert token and token.startswith("mi1.")
    page.wait_for_function(
        "document.getElementById('token').textContent.startsWith('mi1.')", timeout=10000)
    assert page.locator("#token").inner_text() == token
    assert token in page.locator("#join-cmd").inner_text()
    page.click("#copy-token")
    assert page.evaluate("navigator.clipboard.readText()") == token
    page.screenshot(path=str(shots / "console-join.png"))

    page.click("button[data-view=models]")
    page.wait_for_selector("tr[data-model=smollm2-135m] .current", timeout=10000)
    page.screenshot(path=str(shots / "console-models.png"))
    # Download a catalog model (from the local fake hub) and see it become usable.
    page.click("tr[data-model='qwen2.5-0.5b'] button:has-text('Download')")
    page.wait_for_selector("tr[data-model='qwen2.5-0.5b'] button:has-text('Use this model')",
                           timeout=30000)
    assert any(r[0] == "GET" for r in mesh["hub"].requests)

    # Killing a worker removes it from the view within a few seconds.
    page.click("button[data-view=mesh]")
    c_id = mesh["c"].status()["node"]["id"]
    page.wait_for_selector(f".card[data-node='{c_id}']")
    mesh["c"].kill(signal.SIGKILL)
    page.wait_for_selector(f".card[data-node='{c_id}']", state="detached", timeout=10000)
    page.wait_for_function("document.querySelectorAll('.card').length === 2")

    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    mp = phone.new_page()
    mp.on("pageerror", lambda e: errors.append(str(e)))
    mp.goto(a.url + "/#mesh")
    # A new browser is not logged in: a wrong token is refused, the right one pasted works.
    mp.fill("#login-token", "not-the-token-" + "x" * 30)
    mp.click("#login-button")
    mp.wait_for_selector("#login-error:has-text('not this node')", timeout=10000)
    mp.fill("#login-token", a.console_token)
    mp.click("#login-button")
    mp.wait_for_function("document.querySelectorAll('.card').length === 2", timeout=15000)
    mp.screenshot(path=str(shots / "console-mobile.png"))
    phone.close()
    ctx.close()
    assert errors == []
