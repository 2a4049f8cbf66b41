"""Model references: a path, a file in the models dir, a catalog name, or hf://.

``resolve_model(ref)`` says where the GGUF is on this machine (or that it
must be downloaded first); ``read_gguf_metadata(path)`` reads what the plan
needs (layers, size, architecture) with the ``gguf`` package. The catalog is
data: ``catalog.json`` in this package.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

GGUF_MAGIC = b"GGUF"
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.gguf$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelError(ValueError):
    pass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    display_name: str
    repo: str
    file: str
    size_bytes: int
    size_approx: bool
    quant: str
    params: str
    license: str
    sha256: str | None
    description: str
    package: str | None = None
    package_file: str | None = None


@dataclass(frozen=True)
class HfRef:
    repo: str
    file: str
    revision: str = "main"


@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    name: str
    path: Path | None  # None: not on this machine yet (download it)
    size_bytes: int | None
    source: Literal["path", "local", "catalog", "hf"]
    entry: CatalogEntry | None = None
    hf: HfRef | None = None


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    name: str
    layers: int
    context_length: int | None
    size_bytes: int
    file_type: int | None
    n_parts: int


def default_models_dir() -> Path:
    return Path(os.environ.get("MESH_INFERENCE_MODELS") or "local-models")


def _check_entry(raw: Any, i: int) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise ModelError(f"catalog entry {i} is not an object")
    try:
        entry = CatalogEntry(**raw)
    except TypeError as exc:
        raise ModelError(f"catalog entry {i}: {exc}") from None
    if not _NAME.match(entry.name) or not _REPO.match(entry.repo):
        raise ModelError(f"catalog entry {i}: bad name or repo")
    if not entry.file.endswith(".gguf") or ".." in entry.file.split("/"):
        raise ModelError(f"catalog entry {entry.name}: file must be a .gguf inside the repo")
    if not isinstance(entry.size_bytes, int) or entry.size_bytes <= 0:
        raise ModelError(f"catalog entry {entry.name}: bad size")
    if entry.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
        raise ModelError(f"catalog entry {entry.name}: bad sha256")
    return entry


def load_catalog(text: str | None = None) -> list[CatalogEntry]:
    if text is None:
        text = resources.files(__package__).joinpath("catalog.json").read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"catalog is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise ModelError("catalog must be a list")
    entries = [_check_entry(raw, i) for i, raw in enumerate(data)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ModelError("catalog has repeated names")
    return entries


def check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file")


def _package_file(entry: CatalogEntry) -> Path | None:
    if not entry.package or not entry.package_file:
        return None
    spec = importlib.util.find_spec(entry.package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / entry.package_file
        if cand.is_file():
            return cand
    return None


def local_file_for(file: str, models_dir: Path) -> Path:
    """Where a repo file lives once downloaded (flattened: only its base name)."""
    return models_dir / Path(file).name


def parse_hf(ref: str) -> HfRef:
    body = ref[len("hf://") :]
    parts = body.split("/")
    if len(parts) < 3 or not _REPO.match("/".join(parts[:2])):
        raise ModelError(f"{ref!r} is not hf://owner/repo/file.gguf")
    file = "/".join(parts[2:])
    if not file.endswith(".gguf") or any(p in ("", ".", "..") for p in parts[2:]):
        raise ModelError(f"{ref!r}: the file must be a .gguf inside the repo")
    return HfRef("/".join(parts[:2]), file)


def resolve_model(ref: str, models_dir: Path | None = None) -> ResolvedModel:
    models_dir = models_dir or default_models_dir()
    if not isinstance(ref, str) or not ref.strip() or len(ref) > 1024:
        raise ModelError("empty or over-long model reference")
    ref = ref.strip()
    if ref.startswith("hf://"):
        hf = parse_hf(ref)
        local = local_file_for(hf.file, models_dir)
        path = local if local.is_file() else None
        if path is not None:
            check_gguf(path)
        return ResolvedModel(
            ref,
            Path(hf.file).name.removesuffix(".gguf"),
            path,
            path.stat().st_size if path else None,
            "hf",
            hf=hf,
        )
    as_path = Path(ref).expanduser()
    if ref.endswith(".gguf") and ("/" in ref or as_path.is_file()):
        if not as_path.is_file():
            raise ModelError(f"model file {ref} does not exist")
        check_gguf(as_path)
        return ResolvedModel(
            ref,
            as_path.name.removesuffix(".gguf"),
            as_path.resolve(),
            as_path.stat().st_size,
            "path",
        )
    if _NAME.match(ref):
        for cand in (models_dir / ref, models_dir / f"{ref}.gguf"):
            if cand.is_file() and cand.suffix == ".gguf":
                check_gguf(cand)
                return ResolvedModel(
                    ref,
                    cand.name.removesuffix(".gguf"),
                    cand.resolve(),
                    cand.stat().st_size,
                    "local",
                )
        catalog = {e.name: e for e in load_catalog()}
        entry = catalog.get(ref)
        if entry is not None:
            path = _package_file(entry)
            if path is None:
                local = local_file_for(entry.file, models_dir)
                path = local if local.is_file() else None
            if path is not None:
                check_gguf(path)
            return ResolvedModel(
                ref,
                entry.name,
                path,
                path.stat().st_size if path else entry.size_bytes,
                "catalog",
                entry=entry,
                hf=HfRef(entry.repo, entry.file),
            )
        close = difflib.get_close_matches(ref, list(catalog), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {ref!r}: not a file, not in {models_dir}, not in the catalog{hint}"
        )
    raise ModelError(f"{ref!r} is not a model path, name or hf:// reference")


def split_parts(path: Path) -> list[Path]:
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    total = int(m["total"])
    return [path.with_name(f"{m['stem']}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def read_gguf_metadata(path: Path) -> GgufInfo:
    from gguf import GGUFReader

    check_gguf(path)
    parts = split_parts(path)
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"split model {path.name} is missing parts: {', '.join(missing)}")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises many kinds on corrupt input
        raise ModelError(f"{path} is not a readable GGUF: {exc}") from None

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:
            return None

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path} has no general.architecture")
    layers = field(f"{arch}.block_count")
    if not isinstance(layers, int) or layers <= 0:
        raise ModelError(f"{path} has no {arch}.block_count")
    ctx = field(f"{arch}.context_length")
    ft = field("general.file_type")
    name = field("general.name")
    return GgufInfo(
        architecture=arch,
        name=name if isinstance(name, str) else path.stem,
        layers=layers,
        context_length=ctx if isinstance(ctx, int) else None,
        size_bytes=sum(p.stat().st_size for p in parts),
        file_type=ft if isinstance(ft, int) else None,
        n_parts=len(parts),
    )


def list_local_models(models_dir: Path) -> list[ResolvedModel]:
    if not models_dir.is_dir():
        return []
    out = []
    for p in sorted(models_dir.glob("*.gguf")):
        m = _SPLIT.match(p.name)
        if m and int(m["idx"]) != 1:
            continue
        out.append(
            ResolvedModel(p.name, p.name.removesuffix(".gguf"), p, p.stat().st_size, "local")
        )
    return out


def model_fits(size_bytes: int, available_bytes: int) -> bool:
    from .plan import required_bytes

    return required_bytes(size_bytes) <= available_bytes
