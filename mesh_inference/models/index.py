"""A GGUF file's content index: its sha256 and a sha256 per weight tensor, cached on disk.

Public API::

    index = load_or_build_index(path, cache_dir, tensors)  # slow once per file, then cached
                                                   # tensors: GgufInfo.tensors, if already parsed
    index.sha256; index.size; index.regions        # TensorRegion(name, file_offset, nbytes, sha256)
    weights = MappedWeights(path, index)           # core.rpc.WeightFile over an mmap of the file
    weights.region_named(name); weights.region_at(offset, nbytes); weights.read(offset, nbytes)
    weights.close()

Why: the host turns a weight upload into a reference only when the bytes
equal its own file's, and a worker expands a reference only when the
region in *its* file has the same digest. Both sides therefore need, per
tensor, where it lies in the file and a digest of its bytes; the whole
file's digest travels in gossip so the host knows which workers hold the
same file. Hashing a 40 GB file takes a while, so the index is built in a
thread and cached under ``cache_dir`` keyed by the file's path, size and
modification time (a changed file gets a new index). A cache entry that
does not parse is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mesh_inference.core.rpc import TensorRegion
from mesh_inference.machine.state import write_private_file
from mesh_inference.models.ggufheader import GgufError, read_header
from mesh_inference.models.refs import ModelError

INDEX_VERSION = 1
CHUNK = 8 << 20
# Entries are a few hundred bytes per tensor; a 70B model has ~1000 tensors.
MAX_INDEX_FILE = 16 << 20


@dataclass(frozen=True)
class ModelIndex:
    sha256: str  # hex, of the whole file
    size: int
    regions: tuple[TensorRegion, ...]


def _regions_of(path: Path) -> list[tuple[str, int, int]]:
    try:
        return list(read_header(path).tensors)
    except (GgufError, OSError) as exc:
        raise ModelError(f"{path}: cannot read its tensors: {exc}") from None


Regions = Sequence[tuple[str, int, int]]


def build_index(path: Path, tensors: Regions | None = None) -> ModelIndex:
    """Read ``path`` once: the file's sha256 and every tensor's.

    ``tensors`` is the header's tensor table when the caller already parsed it
    (``GgufInfo.tensors``); the file's own bytes are hashed either way.
    """
    regions = list(tensors) if tensors else _regions_of(path)
    size = path.stat().st_size
    for name, off, n in regions:
        if off < 0 or n < 0 or off + n > size:
            raise ModelError(f"{path}: tensor {name!r} lies outside the file")
    whole = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            whole.update(chunk)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                out = tuple(
                    TensorRegion(name, off, n, hashlib.sha256(view[off : off + n]).digest())
                    for name, off, n in regions
                )
            finally:
                view.release()
    return ModelIndex(whole.hexdigest(), size, out)


def _cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{INDEX_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _to_json(index: ModelIndex) -> bytes:
    return json.dumps(
        {
            "v": INDEX_VERSION,
            "sha256": index.sha256,
            "size": index.size,
            "regions": [[r.name, r.file_offset, r.nbytes, r.sha256.hex()] for r in index.regions],
        }
    ).encode()


def _from_json(raw: bytes) -> ModelIndex:
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("v") != INDEX_VERSION:
        raise ValueError("not an index of this version")
    regions = tuple(
        TensorRegion(str(name), int(off), int(n), bytes.fromhex(digest))
        for name, off, n, digest in data["regions"]
    )
    sha, size = data["sha256"], data["size"]
    if not isinstance(sha, str) or len(sha) != 64 or not isinstance(size, int):
        raise ValueError("bad header")
    return ModelIndex(sha, size, regions)


def load_or_build_index(
    path: Path, cache_dir: Path, tensors: Regions | None = None
) -> ModelIndex:
    """The index of ``path``, from ``cache_dir`` when the file has not changed since."""
    cached = cache_dir / f"{_cache_key(path)}.json"
    try:
        if cached.stat().st_size <= MAX_INDEX_FILE:
            index = _from_json(cached.read_bytes())
            if index.size == path.stat().st_size:
                return index
    except (OSError, ValueError, TypeError, KeyError):
        pass  # missing or damaged: rebuild
    index = build_index(path, tensors)
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(cached, _to_json(index))
    return index


class MappedWeights:
    """``core.rpc.WeightFile`` over a read-only mmap of a GGUF and its index."""

    def __init__(self, path: Path, index: ModelIndex) -> None:
        self.path = path
        self.index = index
        self._by_name = {r.name: r for r in index.regions}
        self._by_place = {(r.file_offset, r.nbytes): r for r in index.regions}
        self._by_digest = {(r.sha256, r.nbytes): r for r in index.regions}
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != index.size:
                raise ModelError(f"{path} changed since it was indexed")
            self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._mmap)
        self._reads = 0  # read() calls so far
        self._reads_seen = 0  # ... at the last release_idle_pages()
        self._resident = False  # pages may be mapped in since the last release

    def release_idle_pages(self) -> bool:
        """Unmap the file's pages from this process if nothing read them since the last call.

        A load maps in the tensors it compares or expands (tens of MB to GBs of RSS);
        they stay in the page cache, shared, and come back on the next access. True if
        pages were released.
        """
        busy = self._reads != self._reads_seen
        self._reads_seen = self._reads
        if busy or not self._resident or self._mmap.closed:
            return False
        self._mmap.madvise(mmap.MADV_DONTNEED)
        self._resident = False
        return True

    def region_named(self, name: str) -> TensorRegion | None:
        return self._by_name.get(name)

    def region_at(self, file_offset: int, nbytes: int) -> TensorRegion | None:
        return self._by_place.get((file_offset, nbytes))

    def region_with(self, sha256: bytes, nbytes: int) -> TensorRegion | None:
        return self._by_digest.get((sha256, nbytes))

    def manifest(self) -> bytes:
        """Every tensor's sha256, concatenated: what this file can expand references to."""
        return b"".join(sorted({r.sha256 for r in self.index.regions}))

    def read(self, file_offset: int, nbytes: int) -> memoryview:
        if file_offset < 0 or nbytes < 0 or file_offset + nbytes > self.index.size:
            raise ValueError(f"region {file_offset}+{nbytes} is outside {self.path}")
        self._reads += 1
        self._resident = True
        return self._view[file_offset : file_offset + nbytes]

    def close(self) -> None:
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            pass  # a view is still being written somewhere: the mapping goes with it
