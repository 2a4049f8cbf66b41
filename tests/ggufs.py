"""Tiny GGUF files for tests, written with gguf.GGUFWriter (what the real loader reads)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def tiny_gguf(
    path: Path,
    layers: int = 3,
    *,
    arch: str = "llama",
    file_type: int | None = None,
    split_count: int | None = None,
    block_count: bool = True,
) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    if block_count:
        w.add_block_count(layers)
    w.add_context_length(256)
    w.add_name("tiny")
    if file_type is not None:
        w.add_file_type(file_type)
    if split_count is not None:
        w.add_uint16("split.count", split_count)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
