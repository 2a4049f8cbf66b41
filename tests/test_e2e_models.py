"""Model-aware planning and switching, with real nodes."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mesh_inference.cli.devmesh import LocalMesh
from mesh_inference.models.refs import resolve_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def post(url: str, body: object) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_model_too_big_for_the_mesh_is_reported(tmp_path: Path) -> None:
    lm = LocalMesh(tmp_path, extra_args=["--threads", "1"])
    try:
        a = lm.start_node("a", model="smollm2-135m", max_vram_gb=0.1)
        lm.start_node("b", join=lm.join_token(a), max_vram_gb=0.1)
        st = lm.wait_for(a, lambda s: s["plan"]["state"] == "waiting", timeout=60,
                         what="waiting for capacity")
        assert "needs" in st["plan"]["reason"] and st["plan"]["needed_bytes"] > st["plan"][
            "available_bytes"]
        assert not st["ready"] and st["engine"]["state"] in ("waiting", "stopped")
        code, body = post(f"{a.url}/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}]})
        assert code == 503
        assert "waiting" in str(body["error"]) and "needs" in str(body["error"])
        # a third node brings enough memory: the mesh plans and serves
        lm.start_node("c", join=lm.join_token(a), max_vram_gb=2)
        lm.wait_for(a, lambda s: s["ready"], timeout=120, what="ready after capacity arrived")
    finally:
        lm.stop()


def test_switching_the_model_relaunches_the_mesh(tmp_path: Path) -> None:
    src = resolve_model("smollm2-135m").path
    assert src is not None
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(src, models / "smol-copy.gguf")
    lm = LocalMesh(tmp_path / "nodes", extra_args=["--threads", "1", "--models-dir", str(models)])
    try:
        a = lm.start_node("a", model="smollm2-135m", max_vram_gb=4)
        b = lm.start_node("b", join=lm.join_token(a), max_vram_gb=2)
        lm.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 2, timeout=120,
                    what="ready")
        code, body = b.request("POST", "/api/models/switch", {"ref": "nope-model"})
        assert code == 400 and "unknown model" in str(body["error"])
        code, _ = b.request("POST", "/api/models/switch", {"ref": "smol-copy"})
        assert code == 202
        for node in (a, b):
            lm.wait_for(node, lambda s: s["model"]["ref"] == "smol-copy" and s["ready"],
                        timeout=120, what="serving the new model")
        with urllib.request.urlopen(f"{a.url}/v1/models", timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "smol-copy"
        code, body = post(f"{a.url}/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})
        assert code == 200
    finally:
        lm.stop()


def test_hf_model_is_downloaded_at_start_and_served(tmp_path: Path) -> None:
    """`--model hf://…` on a machine without the file: download (local fake hub), then serve."""
    from fakehub import running_hub

    src = resolve_model("smollm2-135m").path
    assert src is not None
    models = tmp_path / "models"
    with running_hub() as hub:
        hub.add("someone/smol-GGUF", "smol-q4.gguf", src.read_bytes())
        lm = LocalMesh(tmp_path / "nodes", extra_args=["--threads", "1", "--models-dir",
                                                       str(models)],
                       extra_env={"HF_ENDPOINT": hub.url})
        try:
            a = lm.start_node("a", model="hf://someone/smol-GGUF/smol-q4.gguf", max_vram_gb=2)
            st = lm.wait_for(a, lambda s: s["ready"], timeout=120, what="serving the download")
            assert st["model"]["ref"] == "hf://someone/smol-GGUF/smol-q4.gguf"
            assert (models / "smol-q4.gguf").stat().st_size == src.stat().st_size
            code, body = post(f"{a.url}/v1/chat/completions", {"messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0, "max_tokens": 16})
            assert code == 200 and "Paris" in str(body["choices"])
        finally:
            lm.stop()
