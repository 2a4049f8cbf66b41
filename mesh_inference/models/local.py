"""This node's copy of the mesh model: which ref and epoch it follows, and the file here.

Public API::

    lm = LocalModel(models_dir, index_dir, on_change=f)
    lm.adopt(epoch, ref, resolved=None, meta=None)  # follow ``ref``; finds its file here if
                                                    # present (``meta``: its header, if read)
    lm.epoch; lm.ref; lm.resolved; lm.layers; lm.path; lm.size_bytes
    lm.sha256; lm.weights                 # once indexed: file digest, mapped tensors
    lm.served_name()                      # the name the API shows ("smollm2-135m", "model")
    await lm.settled()                    # until the metadata reads scheduled so far ended

Only cheap checks run on the event loop; the GGUF header is read in a
thread, because parsing a large one can take seconds and a blocked loop
misses heartbeats. A file that turns out unusable is dropped (``on_change``
fires) so the node stops announcing that it holds the model. Then, also
in a thread, the file is indexed (models/index.py: its sha256 and each
tensor's, cached): once that is done the node announces the digest, and
the host sends weight references instead of weight bytes to workers that
announce the same one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from mesh_inference.models.index import MappedWeights, load_or_build_index
from mesh_inference.models.refs import (
    GgufInfo,
    ModelError,
    ResolvedModel,
    read_gguf_metadata,
    resolve_model,
)

log = logging.getLogger(__name__)

TRIM_EVERY = 2.0  # seconds without reads of the mapped model before its pages are released


class LocalModel:
    def __init__(self, models_dir: Path, index_dir: Path, on_change: Callable[[], None]) -> None:
        self._models_dir = models_dir
        self._index_dir = index_dir
        self._on_change = on_change
        self.weights: MappedWeights | None = None
        self.epoch = 0
        self.ref: str | None = None
        self.resolved: ResolvedModel | None = None
        self.layers: int | None = None
        self._reads: set[asyncio.Task[None]] = set()
        self._trimmer: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path | None:
        return self.resolved.path if self.resolved is not None else None

    @property
    def sha256(self) -> str | None:
        return self.weights.index.sha256 if self.weights is not None else None

    @property
    def size_bytes(self) -> int:
        return (self.resolved.size_bytes or 0) if self.resolved is not None else 0

    def served_name(self) -> str | None:
        ref = self.ref
        if ref is None:
            return None
        return Path(ref).name.removesuffix(".gguf") if ref.endswith(".gguf") else ref

    def adopt(
        self,
        epoch: int,
        ref: str,
        resolved: ResolvedModel | None = None,
        meta: GgufInfo | None = None,
    ) -> None:
        self.epoch, self.ref = epoch, ref
        self.resolved, self.layers = None, None
        self._drop_weights()
        try:
            resolved = resolved or resolve_model(ref, self._models_dir)
        except ModelError as exc:
            log.info("mesh model %s is not usable here: %s", ref, exc)
            return
        if resolved.path is not None:
            self.resolved = resolved
            task = asyncio.ensure_future(self._read_layers(resolved, meta))
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)

    async def _read_layers(self, resolved: ResolvedModel, meta: GgufInfo | None) -> None:
        assert resolved.path is not None
        try:
            if meta is None:
                meta = await asyncio.to_thread(read_gguf_metadata, resolved.path)
        except ModelError as exc:
            log.warning("model %s is unusable: %s", resolved.ref, exc)
            if self.resolved is resolved:
                self.resolved = None
                self._on_change()
            return
        if self.resolved is not resolved:
            return
        self.layers = meta.layers
        self._on_change()
        try:
            # The header's tensor table is the first part's: reuse it for one-file models.
            tensors = meta.tensors if meta.n_parts == 1 else None
            index = await asyncio.to_thread(
                load_or_build_index, resolved.path, self._index_dir, tensors
            )
            weights = await asyncio.to_thread(MappedWeights, resolved.path, index)
        except (ModelError, OSError, ValueError) as exc:
            # llama-server could not load what gguf cannot index either.
            log.warning("model %s is unusable: cannot index it: %s", resolved.ref, exc)
            if self.resolved is resolved:
                self.resolved = None
                self._on_change()
            return
        if self.resolved is not resolved:
            weights.close()
            return
        self.weights = weights
        if self._trimmer is None:
            self._trimmer = asyncio.ensure_future(self._trim_pages())
        log.info("model %s indexed: sha256 %s, %d tensors", resolved.ref, index.sha256[:16],
                 len(index.regions))  # fmt: skip
        self._on_change()

    async def _trim_pages(self) -> None:
        # Loads touch the mapped model (the host compares, a worker expands); once a
        # load is over, its pages leave this process's RSS (they stay in the page cache).
        while True:
            await asyncio.sleep(TRIM_EVERY)
            if self.weights is not None and self.weights.release_idle_pages():
                log.debug("released the mapped model's idle pages")

    def _drop_weights(self) -> None:
        if self.weights is not None:
            self.weights.close()
            self.weights = None

    async def settled(self) -> None:
        while self._reads:
            await asyncio.gather(*list(self._reads), return_exceptions=True)

    async def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
            await asyncio.gather(self._trimmer, return_exceptions=True)
            self._trimmer = None
        for task in list(self._reads):
            task.cancel()
        await asyncio.gather(*list(self._reads), return_exceptions=True)
        self._drop_weights()
