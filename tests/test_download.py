"""Downloads against a real local HTTP server speaking the hub's file API (HF_ENDPOINT)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakehub import FakeHub, running_hub

from mesh_inference.download import DownloadProgress, download_model, remove_model
from mesh_inference.models import ModelError, resolve_model

pytestmark = pytest.mark.timeout(60)


def gguf_bytes(n: int) -> bytes:
    return b"GGUF" + os.urandom(n - 4)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with running_hub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield h


def test_full_download_with_progress(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf_bytes(3 << 20)
    hub.add("owner/repo", "model.gguf", data)
    seen: list[DownloadProgress] = []
    path = download_model("hf://owner/repo/model.gguf", tmp_path, progress=seen.append)
    assert path == tmp_path / "model.gguf" and path.read_bytes() == data
    assert seen[-1].done and seen[-1].error is None and seen[-1].downloaded_bytes == len(data)
    sizes = [p.downloaded_bytes for p in seen]
    assert sizes == sorted(sizes)
    assert resolve_model("hf://owner/repo/model.gguf", tmp_path).path == path


def test_interrupted_download_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path) -> None:
    data = gguf_bytes(2 << 20)
    hub.add("owner/repo", "model.gguf", data)
    hub.cut_after = 700_000
    with pytest.raises(ModelError, match="run it again to resume"):
        download_model("hf://owner/repo/model.gguf", tmp_path)
    part = tmp_path / "model.gguf.part"
    assert part.stat().st_size == 700_000 and not (tmp_path / "model.gguf").exists()
    path = download_model("hf://owner/repo/model.gguf", tmp_path)
    assert path.read_bytes() == data and not part.exists()
    gets = [r for r in hub.requests if r[0] == "GET"]
    assert gets[-1][2] == "bytes=700000-"


def test_bad_checksum_deletes_and_raises(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("owner/repo", "model.gguf", gguf_bytes(100_000))
    hub.corrupt = True
    errors: list[DownloadProgress] = []
    with pytest.raises(ModelError, match="corrupt"):
        download_model("hf://owner/repo/model.gguf", tmp_path, progress=errors.append)
    assert list(tmp_path.iterdir()) == []
    assert errors[-1].error and "corrupt" in errors[-1].error


def test_split_gguf_downloads_every_part(hub: FakeHub, tmp_path: Path) -> None:
    parts = [gguf_bytes(200_000 + i) for i in range(3)]
    for i, data in enumerate(parts, start=1):
        hub.add("owner/big", f"m-{i:05d}-of-00003.gguf", data)
    path = download_model("hf://owner/big/m-00001-of-00003.gguf", tmp_path)
    assert path.name == "m-00001-of-00003.gguf"
    for i, data in enumerate(parts, start=1):
        assert (tmp_path / f"m-{i:05d}-of-00003.gguf").read_bytes() == data
    removed = remove_model("m-00001-of-00003", tmp_path)
    assert len(removed) == 3 and list(tmp_path.iterdir()) == []


def test_missing_file_is_a_clear_error(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="owner/repo/nope.gguf"):
        download_model("hf://owner/repo/nope.gguf", tmp_path)


def test_token_is_sent(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add("owner/repo", "m.gguf", gguf_bytes(1000))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    download_model("hf://owner/repo/m.gguf", tmp_path)
    assert hub.auth == ["Bearer hf_secret"]
