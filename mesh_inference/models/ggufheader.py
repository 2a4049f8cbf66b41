"""A GGUF header reader: metadata scalars and the tensor table, nothing else.

Public API::

    header = read_header(path)        # GgufHeader; ModelError-free: raises GgufError
    header.fields["general.architecture"]; header.tensors  # (name, file offset, bytes)

Why not ``gguf.GGUFReader``: it maps the whole file as numpy arrays and
pulls in numpy (≈ 1.7 s and tens of MB for SmolLM2, held by a sidecar that
only needs a few scalars and the tensor table). This reads the header
sequentially from a buffered file, keeps only scalar metadata (arrays such
as the tokenizer's vocabulary are skipped), and bounds everything a
malicious file could inflate. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
(versions 2 and 3, little-endian).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_STRING = 1 << 24  # 16 MiB: chat templates are long, nothing legitimate is longer
MAX_ARRAY = 1 << 28
MAX_DIMS = 8
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)
_SCALARS: dict[int, struct.Struct] = {
    _UINT8: struct.Struct("<B"), _INT8: struct.Struct("<b"), _UINT16: struct.Struct("<H"),
    _INT16: struct.Struct("<h"), _UINT32: struct.Struct("<I"), _INT32: struct.Struct("<i"),
    _FLOAT32: struct.Struct("<f"), _BOOL: struct.Struct("<?"), _UINT64: struct.Struct("<Q"),
    _INT64: struct.Struct("<q"), _FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml tensor types: (elements per block, bytes per block), as ggml.h / gguf-py define them.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
    8: (32, 34), 9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144),
    13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
    18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
    40: (64, 36), 41: (128, 18),
}

# general.file_type values (llama.cpp's llama_ftype), for a human-readable quantisation.
FILE_TYPES: dict[int, str] = {
    0: "ALL_F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}

Scalar = int | float | bool | str


class GgufError(ValueError):
    """The file is not a GGUF this reader can make sense of."""


@dataclass(frozen=True)
class GgufHeader:
    version: int
    fields: dict[str, Scalar]  # scalar metadata only
    tensors: tuple[tuple[str, int, int], ...]  # (name, absolute file offset, bytes)
    data_offset: int


class _Reader:
    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh

    def exact(self, n: int) -> bytes:
        data = self._fh.read(n)
        if len(data) != n:
            raise GgufError("the header ends early (truncated file)")
        return data

    def skip(self, n: int) -> None:
        self._fh.seek(n, 1)

    def u32(self) -> int:
        return int(_U32.unpack(self.exact(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.exact(8))[0])

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING:
            raise GgufError(f"a header string claims {n} bytes")
        return self.exact(n).decode("utf-8", "replace")

    def skip_string(self) -> None:
        n = self.u64()
        if n > MAX_STRING:
            raise GgufError(f"a header string claims {n} bytes")
        self.skip(n)

    def value(self, vtype: int) -> Scalar | None:
        """A scalar value, or None for an array (skipped)."""
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            return fmt.unpack(self.exact(fmt.size))[0]  # type: ignore[no-any-return]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            self._skip_array()
            return None
        raise GgufError(f"unknown metadata value type {vtype}")

    def _skip_array(self) -> None:
        etype, count = self.u32(), self.u64()
        if count > MAX_ARRAY:
            raise GgufError(f"a metadata array claims {count} items")
        fmt = _SCALARS.get(etype)
        if fmt is not None:
            self.skip(fmt.size * count)
        elif etype == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            raise GgufError(f"unsupported metadata array of type {etype}")


def tensor_nbytes(ggml_type: int, dims: tuple[int, ...]) -> int:
    block = GGML_BLOCKS.get(ggml_type)
    if block is None:
        raise GgufError(f"unknown ggml tensor type {ggml_type}")
    per_block, block_bytes = block
    count = 1
    for d in dims:
        count *= d
    if count % per_block:
        raise GgufError(f"{count} elements do not fill blocks of {per_block}")
    return count // per_block * block_bytes


def read_header(path: Path) -> GgufHeader:
    with open(path, "rb", buffering=1 << 16) as fh:
        r = _Reader(fh)
        if r.exact(4) != MAGIC:
            raise GgufError("not a GGUF file (no 'GGUF' magic)")
        version = r.u32()
        if version not in (2, 3):
            raise GgufError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = r.u64(), r.u64()
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise GgufError(f"implausible header: {n_tensors} tensors, {n_kv} metadata keys")
        fields: dict[str, Scalar] = {}
        for _ in range(n_kv):
            key = r.string()
            value = r.value(r.u32())
            if value is not None:
                fields[key] = value
        infos: list[tuple[str, int, int]] = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if n_dims > MAX_DIMS:
                raise GgufError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = tuple(r.u64() for _ in range(n_dims))
            ggml_type = r.u32()
            offset = r.u64()
            infos.append((name, offset, tensor_nbytes(ggml_type, dims)))
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not (
            0 < alignment <= 1 << 20 and alignment & (alignment - 1) == 0
        ):
            raise GgufError(f"bad general.alignment {alignment!r}")
        end = fh.tell()
    data_offset = (end + alignment - 1) // alignment * alignment
    tensors = tuple((name, data_offset + off, n) for name, off, n in infos)
    return GgufHeader(version, fields, tensors, data_offset)
