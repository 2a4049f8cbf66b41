"""The model index: whole-file and per-tensor sha256, cached on disk, over an mmap."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from ggufs import tiny_gguf

from mesh_inference.models import index as index_mod
from mesh_inference.models.index import MappedWeights, build_index, load_or_build_index
from mesh_inference.models.refs import ModelError


def test_the_index_matches_the_file(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "m.gguf", layers=2)
    index = build_index(path)
    raw = path.read_bytes()
    assert index.sha256 == hashlib.sha256(raw).hexdigest() and index.size == len(raw)
    assert [r.name for r in index.regions] == ["token_embd.weight"]
    for r in index.regions:
        assert r.sha256 == hashlib.sha256(raw[r.file_offset : r.file_offset + r.nbytes]).digest()
    weights = MappedWeights(path, index)
    try:
        r = index.regions[0]
        assert weights.region_named(r.name) == r and weights.region_at(r.file_offset, r.nbytes) == r
        assert weights.region_named("nope") is None and weights.region_at(0, 1) is None
        assert bytes(weights.read(r.file_offset, r.nbytes)) == raw[r.file_offset :][: r.nbytes]
        with pytest.raises(ValueError, match="outside"):
            weights.read(index.size - 1, 2)
    finally:
        weights.close()


def test_the_cache_is_used_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    first = load_or_build_index(path, cache)
    [entry] = list(cache.iterdir())
    assert entry.stat().st_mode & 0o777 == 0o600
    calls: list[Path] = []
    real = index_mod.build_index
    monkeypatch.setattr(index_mod, "build_index", lambda p, t: calls.append(p) or real(p, t))
    assert load_or_build_index(path, cache) == first and calls == []
    entry.write_text("{not json")  # a damaged cache entry is rebuilt, never trusted
    assert load_or_build_index(path, cache) == first and calls == [path]
    tiny_gguf(path, layers=7)  # a new file at the same path
    os.utime(path, ns=(1, 1))
    assert load_or_build_index(path, cache).sha256 != first.sha256


def test_a_file_that_changed_since_indexing_is_not_mapped(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "m.gguf")
    index = build_index(path)
    with open(path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ModelError, match="changed"):
        MappedWeights(path, index)


def test_not_a_gguf_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelError):
        build_index(bad)


def test_the_header_parse_of_the_metadata_serves_the_index(tmp_path: Path) -> None:
    from mesh_inference.models.refs import read_gguf_metadata

    path = tiny_gguf(tmp_path / "m.gguf", layers=2)
    meta = read_gguf_metadata(path)
    assert [name for name, _off, _n in meta.tensors] == ["token_embd.weight"]
    assert build_index(path, meta.tensors) == build_index(path)


def _mapped_rss(path: Path) -> int:
    """This process's resident bytes of ``path``'s mappings (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_idle_pages_of_the_mapped_model_leave_the_process(tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    tiny_gguf(path)
    with open(path, "ab") as fh:  # 8 MiB more, so there is something to be resident
        fh.write(os.urandom(8 << 20))
    index = build_index(path)
    weights = MappedWeights(path, index)
    try:
        assert not weights.release_idle_pages()  # nothing read yet
        view = weights.read(0, index.size)
        assert sum(view[::4096]) >= 0  # touch every page, as an expansion does
        view.release()
        assert _mapped_rss(path) >= 8 << 20
        assert not weights.release_idle_pages()  # read since the last look: busy
        assert weights.release_idle_pages()  # idle for one period: released
        assert _mapped_rss(path) < 1 << 20
        assert not weights.release_idle_pages()  # nothing more to release
        assert bytes(weights.read(0, 4)) == b"GGUF"  # and it reads on as before
    finally:
        weights.close()
