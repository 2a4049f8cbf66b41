"""Downloads against a real local HTTP hub + CDN speaking the hub's file API (HF_ENDPOINT)."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakehub import COMMIT, FakeHub, running_hub

from mesh_inference.cli.models import models as models_cli
from mesh_inference.models import download
from mesh_inference.models.download import DownloadProgress, download_model, remove_model
from mesh_inference.models.refs import ModelError, list_local_models, resolve_model

pytestmark = pytest.mark.timeout(60)

REF = "hf://owner/repo/model.gguf"


def gguf_bytes(n: int) -> bytes:
    return b"GGUF" + os.urandom(n - 4)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    with running_hub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
        monkeypatch.setattr(download, "PROGRESS_INTERVAL", 0.0)  # report every chunk
        yield h


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


def assert_progress_sane(seen: list[DownloadProgress], total: int) -> None:
    sizes = [p.downloaded_bytes for p in seen]
    assert sizes == sorted(sizes), "progress went backwards"
    assert all(p.total_bytes == total for p in seen)
    assert [p.done for p in seen].count(True) == 1 and seen[-1].done
    assert seen[-1].error is None and seen[-1].downloaded_bytes == total


def test_full_download_through_the_cdn(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(3 << 20)
    hub.add("owner/repo", "model.gguf", data)
    seen: list[DownloadProgress] = []
    path = download_model(REF, models, progress=seen.append)
    assert path == models / "model.gguf" and path.read_bytes() == data
    assert_progress_sane(seen, len(data))
    assert len(seen) > 3  # reported along the way, not only at the end
    assert [p.name for p in os.scandir(models)] == ["model.gguf"]  # no .part left
    # The hub answered the HEAD, the CDN served the bytes in one request.
    assert [(r.server, r.method) for r in hub.requests] == [("hub", "HEAD"), ("cdn", "GET")]
    r = resolve_model(REF, models)
    assert r.path == path and r.size_bytes == len(data)
    # Already here: no network at all the second time.
    n = len(hub.requests)
    assert download_model(REF, models) == path and len(hub.requests) == n


def test_full_download_without_redirect(hub: FakeHub, models: Path) -> None:
    hub.redirect = False
    data = gguf_bytes(500_000)
    hub.add("owner/repo", "model.gguf", data)
    assert download_model(REF, models).read_bytes() == data
    assert all(r.server == "hub" for r in hub.requests)


def test_interrupted_download_resumes_on_the_next_call(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(2 << 20)
    hub.add("owner/repo", "model.gguf", data)
    hub.cut_after = 700_000
    seen: list[DownloadProgress] = []
    with pytest.raises(ModelError, match="run it again to resume"):
        download_model(REF, models, retries=0, progress=seen.append)
    assert seen[-1].done and seen[-1].error and "interrupted" in seen[-1].error
    assert seen[-1].downloaded_bytes == 700_000
    part = models / "model.gguf.part"
    assert part.stat().st_size == 700_000 and not (models / "model.gguf").exists()
    assert resolve_model(REF, models).path is None
    path = download_model(REF, models, retries=0)
    assert path.read_bytes() == data and not part.exists()
    gets = hub.byte_requests()
    assert [g.range for g in gets] == [None, "bytes=700000-"]


@pytest.mark.parametrize("cut", [1000, 123_456])
def test_a_dropped_connection_is_resumed_within_the_call(
    hub: FakeHub, models: Path, cut: int
) -> None:
    data = gguf_bytes(1 << 20)
    hub.add("owner/repo", "model.gguf", data)
    hub.cut_after = cut
    seen: list[DownloadProgress] = []
    path = download_model(REF, models, progress=seen.append)
    assert path.read_bytes() == data
    assert [g.range for g in hub.byte_requests()] == [None, f"bytes={cut}-"]
    assert_progress_sane(seen, len(data))


def test_server_errors_are_retried(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(10_000)
    hub.add("owner/repo", "model.gguf", data)
    hub.fail_next = [503]
    assert download_model(REF, models).read_bytes() == data
    assert len(hub.byte_requests()) == 2


def test_a_refused_download_leaves_no_empty_partial_file(hub: FakeHub, models: Path) -> None:
    hub.add("owner/repo", "model.gguf", gguf_bytes(1000))
    hub.fail_next = [403]
    with pytest.raises(ModelError, match="HTTP 403"):
        download_model(REF, models)
    assert list(models.iterdir()) == []


def test_a_server_that_ignores_range_restarts_cleanly(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(600_000)
    hub.add("owner/repo", "model.gguf", data)
    hub.cut_after = 250_000
    with pytest.raises(ModelError, match="resume"):
        download_model(REF, models, retries=0)
    hub.ignore_range = True
    assert download_model(REF, models).read_bytes() == data
    assert hub.byte_requests()[-1].range == "bytes=250000-"  # asked; got 200, started over


def test_a_partial_file_longer_than_the_remote_is_discarded(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(50_000)
    hub.add("owner/repo", "model.gguf", data)
    models.mkdir()
    (models / "model.gguf.part").write_bytes(b"x" * 60_000)
    assert download_model(REF, models).read_bytes() == data


def test_bad_checksum_deletes_and_raises(hub: FakeHub, models: Path) -> None:
    hub.add("owner/repo", "model.gguf", gguf_bytes(100_000))
    hub.corrupt = True
    seen: list[DownloadProgress] = []
    with pytest.raises(ModelError, match="corrupt: sha256"):
        download_model(REF, models, progress=seen.append)
    assert list(models.iterdir()) == []
    assert seen[-1].done and seen[-1].error and "corrupt" in seen[-1].error


def test_a_resumed_download_is_checked_whole(hub: FakeHub, models: Path) -> None:
    """Bytes from before the interruption count: a stale partial file is caught."""
    data = gguf_bytes(300_000)
    hub.add("owner/repo", "model.gguf", data)
    models.mkdir()
    (models / "model.gguf.part").write_bytes(b"GGUF" + b"\0" * 99_996)  # not its bytes
    with pytest.raises(ModelError, match="corrupt"):
        download_model(REF, models)
    assert [g.range for g in hub.byte_requests()] == ["bytes=100000-"]
    assert list(models.iterdir()) == []
    assert download_model(REF, models).read_bytes() == data  # the next try starts afresh


def test_size_mismatch_is_refused(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(20_000)
    hub.add("owner/repo", "model.gguf", data)
    hub.size_override["owner/repo/model.gguf"] = 30_000
    with pytest.raises(ModelError, match="the hub said 30000 bytes, the download 20000"):
        download_model(REF, models)
    assert not (models / "model.gguf").exists()


def test_catalog_checksum_and_size_are_enforced(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(40_000)
    resolved = resolve_model("qwen2.5-0.5b", models)
    assert resolved.entry is not None and resolved.hf is not None
    hub.add(resolved.hf.repo, resolved.hf.file, data)
    # The catalog's own sha256 wins over the hub's: a hub serving other bytes is caught.
    pinned = dataclasses.replace(resolved, entry=dataclasses.replace(
        resolved.entry, sha256=hashlib.sha256(b"other").hexdigest()))
    with pytest.raises(ModelError, match="corrupt: sha256"):
        download_model(pinned, models)
    exact = dataclasses.replace(resolved, entry=dataclasses.replace(
        resolved.entry, size_approx=False, size_bytes=41_000))
    with pytest.raises(ModelError, match="the catalog says 41000"):
        download_model(exact, models)
    good = dataclasses.replace(resolved, entry=dataclasses.replace(
        resolved.entry, sha256=hashlib.sha256(data).hexdigest()))
    path = download_model(good, models)
    assert path.read_bytes() == data
    assert resolve_model("qwen2.5-0.5b", models).path == path


def test_catalog_name_downloads(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(30_000)
    hub.add("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf", data)
    path = download_model("qwen2.5-0.5b", models)
    assert path == models / "qwen2.5-0.5b-instruct-q4_k_m.gguf" and path.read_bytes() == data


def test_split_gguf_downloads_every_part(hub: FakeHub, models: Path) -> None:
    parts = [gguf_bytes(200_000 + i) for i in range(3)]
    for i, data in enumerate(parts, start=1):
        hub.add("owner/big", f"Q4/m-{i:05d}-of-00003.gguf", data)
    seen: list[DownloadProgress] = []
    path = download_model("hf://owner/big/Q4/m-00001-of-00003.gguf", models,
                          progress=seen.append)
    assert path == models / "m-00001-of-00003.gguf"
    for i, data in enumerate(parts, start=1):
        assert (models / f"m-{i:05d}-of-00003.gguf").read_bytes() == data
    assert_progress_sane(seen, sum(map(len, parts)))
    assert [m.name for m in list_local_models(models)] == ["m-00001-of-00003"]
    removed = remove_model("m-00001-of-00003", models)
    assert len(removed) == 3 and list(models.iterdir()) == []


def test_split_download_resumes_at_the_part_it_stopped(hub: FakeHub, models: Path) -> None:
    parts = [gguf_bytes(300_000), gguf_bytes(300_000)]
    for i, data in enumerate(parts, start=1):
        hub.add("owner/big", f"m-{i:05d}-of-00002.gguf", data)
    ref = "hf://owner/big/m-00001-of-00002.gguf"
    models.mkdir()
    (models / "m-00001-of-00002.gguf").write_bytes(parts[0])  # finished earlier
    (models / "m-00002-of-00002.gguf.part").write_bytes(parts[1][:1000])
    assert resolve_model(ref, models).path is None  # not usable yet
    seen: list[DownloadProgress] = []
    download_model(ref, models, progress=seen.append)
    assert (models / "m-00002-of-00002.gguf").read_bytes() == parts[1]
    assert [g.range for g in hub.byte_requests()] == ["bytes=1000-"]
    assert seen[0].downloaded_bytes == 300_000
    assert_progress_sane(seen, 600_000)


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("hf://owner/repo/nope.gguf", "the hub has no file owner/repo/nope.gguf"),
        ("hf://nobody/nothing/m.gguf", "repo nobody/nothing not found"),
        ("hf://owner/repo@v9/model.gguf", "revision 'v9' not found in owner/repo"),
    ],
)
def test_missing_things_are_clear_errors(
    hub: FakeHub, models: Path, ref: str, match: str
) -> None:
    hub.add("owner/repo", "model.gguf", gguf_bytes(100))
    with pytest.raises(ModelError, match=match):
        download_model(ref, models)


def test_a_pinned_revision_downloads(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(1000)
    hub.add("owner/repo", "model.gguf", data)
    assert download_model(f"hf://owner/repo@{COMMIT}/model.gguf", models).read_bytes() == data
    assert f"/resolve/{COMMIT}/" in hub.requests[0].path


def test_an_unreachable_hub_is_a_clear_error(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_hub() as h:
        url = h.url  # closed when the block ends: nothing listens there any more
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(ModelError, match="cannot reach the hub"):
        download_model(REF, models)


def test_gated_repo_needs_the_token(
    hub: FakeHub, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = gguf_bytes(1000)
    hub.add("owner/repo", "model.gguf", data)
    hub.require_token = "hf_secret"
    with pytest.raises(ModelError, match="gated"):
        download_model(REF, models)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert download_model(REF, models).read_bytes() == data
    head = hub.requests[-2]
    assert (head.server, head.method, head.authorization) == ("hub", "HEAD", "Bearer hf_secret")
    cdn = hub.requests[-1]
    assert cdn.server == "cdn" and cdn.authorization is None  # the token stays with the hub


def test_token_argument_goes_to_the_hub_only(hub: FakeHub, models: Path) -> None:
    hub.redirect = False
    hub.add("owner/repo", "m.gguf", gguf_bytes(1000))
    download_model("hf://owner/repo/m.gguf", models, token="hf_arg")
    assert [r.authorization for r in hub.requests] == ["Bearer hf_arg", "Bearer hf_arg"]


def test_two_downloads_of_one_file_do_not_mix(hub: FakeHub, models: Path) -> None:
    hub.add("owner/repo", "model.gguf", gguf_bytes(1000))
    models.mkdir()
    with open(models / "model.gguf.part", "ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ModelError, match="being downloaded by another process"):
            download_model(REF, models)
    assert download_model(REF, models).is_file()


def test_local_models_need_no_download(hub: FakeHub, models: Path, tmp_path: Path) -> None:
    f = tmp_path / "own.gguf"
    f.write_bytes(gguf_bytes(100))
    seen: list[DownloadProgress] = []
    assert download_model(str(f), models, progress=seen.append) == f.resolve()
    assert seen == [DownloadProgress("own", 100, 100, done=True)]
    assert hub.requests == []


def test_remove_model(hub: FakeHub, models: Path, smollm2_path: Path) -> None:
    hub.add("owner/repo", "model.gguf", gguf_bytes(1000))
    download_model(REF, models)
    (models / "other.gguf.part").write_bytes(b"GGUF")
    assert remove_model(REF, models) == [models / "model.gguf"]
    assert remove_model("other", models) == [models / "other.gguf.part"]
    with pytest.raises(ModelError, match="nothing to remove"):
        remove_model(REF, models)
    with pytest.raises(ModelError, match="unknown model"):
        remove_model("no-such-model", models)
    with pytest.raises(ModelError, match="not a downloaded model"):
        remove_model("smollm2-135m", models)  # ships in a package: not ours to delete
    assert smollm2_path.is_file()


def test_models_cli_download_list_rm(hub: FakeHub, models: Path) -> None:
    data = gguf_bytes(200_000)
    hub.add("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf", data)
    runner = CliRunner()
    args = ["--models-dir", str(models)]
    res = runner.invoke(models_cli, ["download", "qwen2.5-0.5b", *args])
    assert res.exit_code == 0, res.output
    assert "downloaded" in res.output
    assert (models / "qwen2.5-0.5b-instruct-q4_k_m.gguf").read_bytes() == data
    res = runner.invoke(models_cli, ["download", "qwen2.5-0.5b", *args])
    assert res.exit_code == 0 and "already on this machine" in res.output
    res = runner.invoke(models_cli, ["list", *args])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "qwen2.5-0.5b " in line)
    assert "yes" in row and "Q4_K_M" in row
    assert "llama-3.3-70b" in res.output and "needs a mesh" in res.output
    res = runner.invoke(models_cli, ["rm", "qwen2.5-0.5b", *args])
    assert res.exit_code == 0 and "removed" in res.output
    assert list(models.iterdir()) == []
    absent = "Qwen/Qwen2.5-0.5B-Instruct-GGUF/absent.gguf"
    res = runner.invoke(models_cli, ["download", f"hf://{absent}", *args])
    assert res.exit_code == 1 and f"no file {absent}" in res.output
    res = runner.invoke(models_cli, ["download", "qwen2.5-0.5", *args])
    assert res.exit_code == 1 and "did you mean qwen2.5-0.5b" in res.output
