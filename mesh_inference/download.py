"""Download GGUF models from a Hugging Face hub: resumable, verified, with progress.

``download_model(ref, models_dir)`` fetches a catalog model or an
``hf://owner/repo/file.gguf`` (every part of a split GGUF) into
``models_dir``. Metadata comes from the hub's HEAD answer (via
huggingface_hub, which honours ``HF_ENDPOINT`` and ``HF_TOKEN``); bytes are
streamed into ``<file>.part`` and a later call continues with a Range
request. The result is checked against the expected size and sha256 (the
catalog's, else the hub's LFS ETag) before it is renamed into place; a
mismatch deletes the partial file and raises :class:`ModelError`.
Blocking: call it in a thread from async code.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .models import (
    HfRef,
    ModelError,
    ResolvedModel,
    local_file_for,
    resolve_model,
    split_parts,
)

CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DownloadProgress:
    name: str
    downloaded_bytes: int
    total_bytes: int | None
    done: bool = False
    error: str | None = None


Progress = Callable[[DownloadProgress], None]


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _metadata(
    repo: str, file: str, revision: str, token: str | None
) -> tuple[str, int, str | None]:
    """(download URL, size, sha256 or None) from the hub's HEAD answer."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo, file, revision=revision, endpoint=_endpoint())
    try:
        meta = get_hf_file_metadata(url, token=token or False, endpoint=_endpoint())
    except Exception as exc:
        raise ModelError(f"cannot reach the hub for {repo}/{file}: {exc}") from None
    if meta.size is None or meta.size <= 0:
        raise ModelError(f"the hub gave no size for {repo}/{file}")
    etag = (meta.etag or "").strip('"').removeprefix("W/").strip('"')
    return meta.location or url, int(meta.size), etag if _SHA256.match(etag) else None


def _fetch(
    url: str,
    dest: Path,
    size: int,
    token: str | None,
    name: str,
    progress: Progress | None,
    done_before: int,
    total: int,
) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as exc:
        raise ModelError(f"download of {dest.name} failed: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ModelError(f"download of {dest.name} failed: {exc}") from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored the range: start over
        mode = "ab" if have else "wb"
        last = 0.0
        with open(part, mode) as fh:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, ValueError) as exc:
                    raise ModelError(
                        f"download of {dest.name} interrupted at {have} of {size} bytes ({exc}); "
                        "run it again to resume"
                    ) from None
                if not chunk:
                    break
                fh.write(chunk)
                have += len(chunk)
                if have > size:
                    break
                now = time.monotonic()
                if progress is not None and now - last > 0.2:
                    last = now
                    progress(DownloadProgress(name, done_before + have, total))
    if have != size:
        if have > size:
            part.unlink(missing_ok=True)
        raise ModelError(
            f"download of {dest.name} ended at {have} of {size} bytes; run it again to resume"
        )


def download_model(
    ref: str | ResolvedModel,
    models_dir: Path,
    *,
    progress: Progress | None = None,
    token: str | None = None,
) -> Path:
    """Download a catalog or hf:// model into ``models_dir``; returns the (first) GGUF path."""
    token = token if token is not None else os.environ.get("HF_TOKEN")
    resolved = ref if isinstance(ref, ResolvedModel) else resolve_model(ref, models_dir)
    name = resolved.name
    try:
        if resolved.path is not None and resolved.source != "hf":
            return resolved.path
        hf: HfRef | None = resolved.hf
        if hf is None:
            raise ModelError(f"{resolved.ref!r} is a local file; there is nothing to download")
        models_dir.mkdir(parents=True, exist_ok=True)
        files = [
            str(Path(hf.file).parent / p.name) if "/" in hf.file else p.name
            for p in split_parts(Path(hf.file))
        ]
        metas = [_metadata(hf.repo, f, hf.revision, token) for f in files]
        total = sum(m[1] for m in metas)
        done = 0
        for i, (file, (url, size, etag)) in enumerate(zip(files, metas, strict=True)):
            dest = local_file_for(file, models_dir)
            if dest.is_file() and dest.stat().st_size == size:
                done += size
                continue
            _fetch(url, dest, size, token, name, progress, done, total)
            part = dest.with_name(dest.name + ".part")
            want = resolved.entry.sha256 if resolved.entry and i == 0 and len(files) == 1 else etag
            if want is not None:
                got = _sha256_of(part)
                if got != want:
                    part.unlink(missing_ok=True)
                    raise ModelError(
                        f"{dest.name} is corrupt: sha256 {got[:12]}… but {want[:12]}… expected; "
                        "the partial file was deleted"
                    )
            os.replace(part, dest)
            done += size
        if progress is not None:
            progress(DownloadProgress(name, total, total, done=True))
        return local_file_for(files[0], models_dir)
    except ModelError as exc:
        if progress is not None:
            progress(DownloadProgress(name, 0, None, done=True, error=str(exc)))
        raise


def remove_model(name: str, models_dir: Path) -> list[Path]:
    """Delete a downloaded model (every part, and partial files); returns what was removed."""
    resolved = resolve_model(name, models_dir)
    if resolved.path is None or models_dir.resolve() not in resolved.path.resolve().parents:
        raise ModelError(f"{name!r} is not a downloaded model in {models_dir}")
    removed = []
    for p in split_parts(resolved.path):
        for q in (p, p.with_name(p.name + ".part")):
            if q.exists():
                q.unlink()
                removed.append(q)
    return removed
