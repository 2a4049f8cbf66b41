"""Model references: a path, a file in the models dir, a catalog name, or hf://.

Public API:

- ``load_catalog(text=None) -> list[CatalogEntry]``: the shipped
  ``catalog.json`` (package data), validated; ``text`` checks other JSON.
- ``default_models_dir() -> Path``: ``$MESH_INFERENCE_MODELS`` or
  ``./local-models``.
- ``resolve_model(ref, models_dir=None) -> ResolvedModel``: where the GGUF
  is on this machine, or ``path=None`` when it must be downloaded first
  (a catalog model not installed, an ``hf://`` file not in ``models_dir``).
  Refs: a path to a ``.gguf``; a file name (with or without ``.gguf``) in
  ``models_dir``; a catalog name; ``hf://owner/repo[@revision]/path/file.gguf``.
  A split GGUF (``-00001-of-0000N.gguf``) counts as here only when every
  part is. A path that does not exist here is looked for as
  ``models_dir/<its base name>`` (where a copy fetched from a peer lands).
- ``local_copy_path(ref, models_dir) -> Path``: where a copy of a
  single-file model must be put for ``resolve_model`` to find it (the
  download naming for catalog and ``hf://`` refs); ``ModelError`` for split
  models and refs that name no file.
- ``read_gguf_metadata(path) -> GgufInfo``: architecture, layers, context,
  size (all parts of a split model), quantization.
- ``list_local_models(models_dir) -> list[ResolvedModel]``.
- ``model_fits(size_bytes, available_bytes, required_bytes=None) -> bool``.
- Helpers shared with download.py: ``parse_hf``, ``split_parts``,
  ``split_files``, ``local_file_for``, ``check_gguf``.

Every failure is a :class:`ModelError` with a message meant for a person.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Literal, TypeVar

from mesh_inference.core.messages import SHA256_HEX
from mesh_inference.models.ggufheader import FILE_TYPES, GgufError, read_header

GGUF_MAGIC = b"GGUF"
MAX_REF_LENGTH = 1024
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.gguf$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_P = TypeVar("_P", bound=PurePath)


class ModelError(ValueError):
    """A model reference, catalog or file that cannot be used (the message says why)."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    display_name: str
    repo: str
    file: str  # path inside the repo; a split model names its first part
    size_bytes: int  # all parts together
    size_approx: bool
    quant: str
    params: str
    license: str
    sha256: str | None  # of ``file`` (single-file models only); None: trust the hub's
    description: str
    package: str | None = None  # a pip package that ships the file
    package_file: str | None = None
    revision: str = "main"


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
    layers: int  # <arch>.block_count
    context_length: int | None
    size_bytes: int  # every part of a split model
    file_type: int | None  # general.file_type (a llama_ftype)
    quant: str | None  # file_type as a name, e.g. "Q4_K_M"
    n_parts: int
    # (name, data offset, bytes) of every tensor in the first part: parsing a GGUF
    # header costs seconds on big vocabularies, so the model index reuses this.
    tensors: tuple[tuple[str, int, int], ...] = ()


def default_models_dir() -> Path:
    return Path(os.environ.get("MESH_INFERENCE_MODELS") or "local-models")


# ---------------------------------------------------------------------------
# catalog

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "display_name": (str,),
    "repo": (str,),
    "file": (str,),
    "size_bytes": (int,),
    "size_approx": (bool,),
    "quant": (str,),
    "params": (str,),
    "license": (str,),
    "sha256": (str, type(None)),
    "description": (str,),
    "package": (str, type(None)),
    "package_file": (str, type(None)),
    "revision": (str,),
}
_REQUIRED = {f.name for f in fields(CatalogEntry)} - {"package", "package_file", "revision"}


def _check_entry(raw: Any, i: int) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise ModelError(f"catalog entry {i} is not an object")
    label = f"catalog entry {i} ({raw.get('name')!r})" if "name" in raw else f"catalog entry {i}"
    unknown = sorted(set(raw) - set(_FIELD_TYPES))
    missing = sorted(_REQUIRED - set(raw))
    if unknown or missing:
        parts = ([f"unknown fields {unknown}"] if unknown else []) + (
            [f"missing fields {missing}"] if missing else []
        )
        raise ModelError(f"{label}: {', '.join(parts)}")
    for key, value in raw.items():
        # bool is an int in Python: a size of `true` must not pass.
        if not isinstance(value, _FIELD_TYPES[key]) or (
            isinstance(value, bool) and bool not in _FIELD_TYPES[key]
        ):
            raise ModelError(f"{label}: field {key!r} has the wrong type")
    entry = CatalogEntry(**raw)
    if not _NAME.match(entry.name):
        raise ModelError(f"{label}: bad name")
    if not _REPO.match(entry.repo):
        raise ModelError(f"{label}: repo must be owner/name")
    if not _REVISION.match(entry.revision):
        raise ModelError(f"{label}: bad revision")
    if not _is_repo_file(entry.file):
        raise ModelError(f"{label}: file must be a .gguf inside the repo")
    m = _SPLIT.match(PurePosixPath(entry.file).name)
    if m and int(m["idx"]) != 1:
        raise ModelError(f"{label}: a split model must name its first part")
    if entry.size_bytes <= 0:
        raise ModelError(f"{label}: size_bytes must be positive")
    if entry.sha256 is not None and (not SHA256_HEX.fullmatch(entry.sha256) or m):
        raise ModelError(f"{label}: sha256 must be 64 lowercase hex digits, single files only")
    if not all((entry.display_name, entry.quant, entry.params, entry.license)):
        raise ModelError(f"{label}: display_name, quant, params and license must not be empty")
    if (entry.package is None) != (entry.package_file is None):
        raise ModelError(f"{label}: package and package_file go together")
    if entry.package_file is not None and (
        not entry.package_file.endswith(".gguf") or "/" in entry.package_file
    ):
        raise ModelError(f"{label}: package_file must be a .gguf file name")
    return entry


@functools.cache
def _shipped_catalog() -> tuple[CatalogEntry, ...]:
    text = resources.files(__package__).joinpath("catalog.json").read_text("utf-8")
    return tuple(load_catalog(text))


def load_catalog(text: str | None = None) -> list[CatalogEntry]:
    """The catalog shipped in this package (or ``text``), validated."""
    if text is None:
        return list(_shipped_catalog())
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ModelError(f"catalog is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise ModelError("catalog must be a list")
    entries = [_check_entry(raw, i) for i, raw in enumerate(data)]
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelError(f"catalog has repeated names: {', '.join(dupes)}")
    return entries


# ---------------------------------------------------------------------------
# files


def _is_repo_file(file: str) -> bool:
    parts = file.split("/")
    return (
        file.endswith(".gguf")
        and len(file) <= 500
        and all(p not in ("", ".", "..") for p in parts)
        and "\\" not in file
        and all(c.isprintable() for c in file)
    )


def check_gguf(path: Path) -> None:
    """Raise ModelError unless ``path`` is a readable file starting with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")


def split_parts(path: _P) -> list[_P]:
    """Every part of a split GGUF named like ``x-00001-of-00003.gguf`` (else ``[path]``)."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    total = int(m["total"])
    if total < 1 or int(m["idx"]) > total:
        return [path]
    return [path.with_name(f"{m['stem']}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def split_files(file: str) -> list[str]:
    """Like :func:`split_parts` for a repo path (``sub/x-00001-of-00002.gguf``)."""
    return [str(p) for p in split_parts(PurePosixPath(file))]


def _first_part(path: Path) -> Path:
    return split_parts(path)[0]


def local_file_for(file: str, models_dir: Path) -> Path:
    """Where a repo file lives once downloaded (flattened: only its base name)."""
    return models_dir / PurePosixPath(file).name


def _all_parts_here(first: Path) -> bool:
    return all(p.is_file() for p in split_parts(first))


def _check_complete(path: Path) -> None:
    missing = [p.name for p in split_parts(path) if not p.is_file()]
    if missing:
        raise ModelError(f"split model {path.name} is missing parts: {', '.join(missing)}")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in split_parts(path) if p.is_file())


def _package_file(entry: CatalogEntry) -> Path | None:
    if not entry.package or not entry.package_file:
        return None
    # find_spec, not import: a package's __init__ may need things we lack.
    try:
        spec = importlib.util.find_spec(entry.package.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / entry.package_file
        if cand.is_file():
            return cand
    return None


# ---------------------------------------------------------------------------
# references


def parse_hf(ref: str) -> HfRef:
    """``hf://owner/repo[@revision]/path/file.gguf`` → :class:`HfRef`."""
    if not ref.startswith("hf://"):
        raise ModelError(f"{ref!r} is not an hf:// reference")
    parts = ref[len("hf://") :].split("/")
    if len(parts) < 3:
        raise ModelError(f"{ref!r} is not hf://owner/repo/file.gguf")
    owner, repo = parts[0], parts[1]
    revision = "main"
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not _REVISION.match(revision):
            raise ModelError(f"{ref!r}: bad revision {revision!r}")
    if not _REPO.match(f"{owner}/{repo}"):
        raise ModelError(f"{ref!r} is not hf://owner/repo/file.gguf")
    file = "/".join(parts[2:])
    if not _is_repo_file(file):
        raise ModelError(f"{ref!r}: the file must be a .gguf inside the repo")
    return HfRef(f"{owner}/{repo}", file, revision)


def _here(file: str, models_dir: Path) -> Path | None:
    """The downloaded file in ``models_dir`` if it and all its parts are there."""
    local = local_file_for(file, models_dir)
    if not local.is_file() or not _all_parts_here(local):
        return None
    check_gguf(local)
    return local


def resolve_model(ref: str, models_dir: Path | None = None) -> ResolvedModel:
    """Say where the model ``ref`` is on this machine (``path=None``: download it first)."""
    models_dir = models_dir if models_dir is not None else default_models_dir()
    if not isinstance(ref, str) or not ref.strip() or len(ref) > MAX_REF_LENGTH:
        raise ModelError("empty or over-long model reference")
    ref = ref.strip()
    if "\0" in ref:
        raise ModelError("a model reference cannot contain NUL")
    if ref.startswith("hf://"):
        hf = parse_hf(ref)
        path = _here(hf.file, models_dir)
        return ResolvedModel(
            ref,
            PurePosixPath(hf.file).name.removesuffix(".gguf"),
            path,
            _size(path) if path else None,
            "hf",
            hf=hf,
        )
    as_path = Path(ref).expanduser()
    if ref.endswith(".gguf") and ("/" in ref or as_path.is_file()):
        if not as_path.is_file():
            # Another machine's path: a copy of it (fetched from a peer) is in models_dir.
            copy = models_dir / as_path.name
            if not _NAME.match(as_path.name) or not copy.is_file():
                raise ModelError(f"model file {ref} does not exist")
            as_path = copy
        first = _first_part(as_path)
        check_gguf(first)
        _check_complete(first)
        return ResolvedModel(
            ref, first.name.removesuffix(".gguf"), first.resolve(), _size(first), "path"
        )
    if not _NAME.match(ref):
        raise ModelError(f"{ref!r} is not a model path, name or hf:// reference")
    for cand in (models_dir / f"{ref}.gguf", models_dir / ref):
        if cand.suffix == ".gguf" and cand.is_file():
            first = _first_part(cand)
            check_gguf(first)
            _check_complete(first)
            return ResolvedModel(
                ref, first.name.removesuffix(".gguf"), first.resolve(), _size(first), "local"
            )
    catalog = {e.name: e for e in load_catalog()}
    entry = catalog.get(ref)
    if entry is None:
        close = difflib.get_close_matches(ref, list(catalog), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {ref!r}: not a file, not in {models_dir}, not in the catalog{hint}"
        )
    path = _package_file(entry)
    if path is not None:
        check_gguf(path)
    else:
        path = _here(entry.file, models_dir)
    return ResolvedModel(
        ref,
        entry.name,
        path,
        _size(path) if path else entry.size_bytes,
        "catalog",
        entry=entry,
        hf=HfRef(entry.repo, entry.file, entry.revision),
    )


def local_copy_path(ref: str, models_dir: Path) -> Path:
    """Where a copy of the single-file model ``ref`` goes so that :func:`resolve_model` finds it.

    Catalog and ``hf://`` refs: the download's file name; a name: ``<name>.gguf``
    in ``models_dir``; a path: its base name in ``models_dir``.
    """
    ref = ref.strip() if isinstance(ref, str) else ""
    if not ref or len(ref) > MAX_REF_LENGTH or "\0" in ref:
        raise ModelError("empty or over-long model reference")
    if ref.startswith("hf://"):
        dest = local_file_for(parse_hf(ref).file, models_dir)
    elif ref.endswith(".gguf") and "/" in ref:
        name = Path(ref).name
        if not _NAME.match(name):
            raise ModelError(f"{ref!r}: {name!r} is not a usable file name")
        dest = models_dir / name
    elif not _NAME.match(ref):
        raise ModelError(f"{ref!r} is not a model path, name or hf:// reference")
    elif ref.endswith(".gguf"):
        dest = models_dir / ref
    else:
        entry = next((e for e in load_catalog() if e.name == ref), None)
        dest = local_file_for(entry.file, models_dir) if entry else models_dir / f"{ref}.gguf"
    if len(split_parts(dest)) > 1:
        raise ModelError(
            f"{dest.name} is part of a split (multi-part) GGUF: peers copy single-file "
            "models only; download it, or copy every part into the models folder"
        )
    return dest


# ---------------------------------------------------------------------------
# metadata


def _quant_name(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    name = FILE_TYPES.get(file_type)
    return None if name is None else name.removeprefix("MOSTLY_")


def read_gguf_metadata(path: Path) -> GgufInfo:
    """What the planner needs from a GGUF (the first part of a split model)."""
    path = _first_part(path)
    check_gguf(path)
    parts = split_parts(path)
    _check_complete(path)
    for p in parts[1:]:
        check_gguf(p)
    try:
        header = read_header(path)
    except (GgufError, OSError) as exc:
        raise ModelError(f"{path} is not a readable GGUF: {exc}") from None

    def field(key: str) -> Any:
        return header.fields.get(key)

    arch = field("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError(f"{path} has no general.architecture")
    layers = field(f"{arch}.block_count")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers < 100_000:
        raise ModelError(f"{path} has no valid {arch}.block_count")
    count = field("split.count")
    if isinstance(count, int) and count > 1 and count != len(parts):
        raise ModelError(
            f"{path.name} says it is part of a {count}-part split model, "
            f"but its name says {len(parts)}"
        )
    tensors = header.tensors
    ctx = field(f"{arch}.context_length")
    ft = field("general.file_type")
    name = field("general.name")
    file_type = ft if isinstance(ft, int) and not isinstance(ft, bool) else None
    return GgufInfo(
        architecture=arch,
        name=name if isinstance(name, str) and name else path.name.removesuffix(".gguf"),
        layers=layers,
        context_length=ctx if isinstance(ctx, int) and ctx > 0 else None,
        size_bytes=_size(path),
        file_type=file_type,
        quant=_quant_name(file_type),
        n_parts=len(parts),
        tensors=tensors,
    )


# ---------------------------------------------------------------------------
# local models and capacity


def list_local_models(models_dir: Path) -> list[ResolvedModel]:
    """Complete GGUF models in ``models_dir`` (a split model once, by its first part)."""
    if not models_dir.is_dir():
        return []
    out = []
    for p in sorted(models_dir.glob("*.gguf")):
        m = _SPLIT.match(p.name)
        if (m and int(m["idx"]) != 1) or not p.is_file() or not _all_parts_here(p):
            continue
        try:
            check_gguf(p)
        except ModelError:
            continue
        out.append(ResolvedModel(p.name, p.name.removesuffix(".gguf"), p, _size(p), "local"))
    return out


def model_fits(
    size_bytes: int,
    available_bytes: int,
    required_bytes: Callable[[int], int] | None = None,
) -> bool:
    """Whether ``available_bytes`` of memory can run a model of ``size_bytes``."""
    if required_bytes is None:
        from mesh_inference.core.plan import required_bytes as plan_required_bytes

        required_bytes = plan_required_bytes
    return required_bytes(size_bytes) <= available_bytes
