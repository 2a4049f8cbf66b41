"""Download GGUF models from a Hugging Face hub: resumable, verified, with progress.

Public API:

- ``download_model(ref, models_dir, *, progress=None, token=None, retries=3) -> Path``
  fetches a catalog model or an ``hf://owner/repo[@rev]/file.gguf`` (every
  part of a split GGUF) into ``models_dir`` and returns the (first) GGUF.
  A model already on this machine is returned without touching the network.
- ``remove_model(name, models_dir) -> list[Path]`` deletes a downloaded model
  (every part, and partial files).
- ``DownloadProgress``: what ``progress`` receives, a few times a second and
  once more with ``done=True`` (and ``error`` set on failure).

How: huggingface_hub's HEAD (it honours ``HF_ENDPOINT``; the token is
``token``, else ``HF_TOKEN`` / the saved login) gives the size, the sha256
(``X-Linked-Etag`` of LFS files) and where the bytes are (the hub redirects
LFS files to a CDN). The bytes stream into ``<file>.part``; a dropped
connection is resumed with a ``Range`` request, ``retries`` times within the
call, and a later call continues from the partial file. The sha256 (the
catalog's if it has one, else the hub's) and size are checked before the
file is renamed into place; a mismatch deletes the partial file and raises
:class:`ModelError`. Blocking: call it in a thread from async code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from mesh_inference.core.messages import SHA256_HEX
from mesh_inference.models.refs import (
    ModelError,
    ResolvedModel,
    local_file_for,
    resolve_model,
    split_files,
    split_parts,
)

CHUNK = 1 << 20
PROGRESS_INTERVAL = 0.25  # seconds between progress reports
RETRY_DELAYS = (0.0, 1.0, 3.0, 10.0)  # back-off between resumes within one call
SOCKET_TIMEOUT = 30.0
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class DownloadProgress:
    name: str
    downloaded_bytes: int
    total_bytes: int | None
    done: bool = False
    error: str | None = None


Progress = Callable[[DownloadProgress], None]


@dataclass(frozen=True)
class _Remote:
    file: str  # path in the repo
    url: str  # where the bytes are (the CDN for LFS files)
    size: int
    sha256: str | None


class _Interrupted(Exception):
    """The transfer stopped early; the partial file is kept and may be resumed."""


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _default_token() -> str | None:
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    try:
        from huggingface_hub import get_token

        saved = get_token()
    except Exception:  # a broken login must not stop a public download
        return None
    return saved if isinstance(saved, str) and saved else None


def _metadata(repo: str, file: str, revision: str, token: str | None) -> _Remote:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

    endpoint = _endpoint()
    what = f"{repo}/{file}"
    try:
        url = hf_hub_url(repo, file, revision=revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=token or False, endpoint=endpoint)
    except GatedRepoError:
        raise ModelError(
            f"{repo} is gated: accept its terms on the hub, then set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"repo {repo} not found on {endpoint} (if it is private, set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"revision {revision!r} not found in {repo}") from None
    except EntryNotFoundError:
        raise ModelError(f"the hub has no file {what} (revision {revision})") from None
    except HfHubHTTPError as exc:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", "?")
        raise ModelError(f"the hub answered HTTP {status} for {what}") from None
    except Exception as exc:  # connection refused, DNS, offline mode, timeouts…
        raise ModelError(f"cannot reach the hub at {endpoint} for {what}: {exc}") from None
    if meta.size is None or meta.size <= 0:
        raise ModelError(f"the hub gave no size for {what}")
    location = meta.location or url
    if urllib.parse.urlsplit(location).scheme not in ("http", "https"):
        raise ModelError(f"the hub sent {what} to a non-HTTP location")
    etag = (meta.etag or "").lower()
    return _Remote(file, location, int(meta.size), etag if SHA256_HEX.fullmatch(etag) else None)


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (pa.scheme, pa.netloc.lower()) == (pb.scheme, pb.netloc.lower())


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: Any, newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-HTTP URL", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    # Not build_opener(): that also speaks file:// and ftp://, and the
    # download URL comes from a server.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def _locked(part: Path) -> Iterator[IO[bytes]]:
    """The partial file, open for appending and locked against a second downloader."""
    # Unbuffered: after an interruption the file's size is exactly what was
    # received, which is where the Range request resumes.
    fh = open(part, "ab", buffering=0)  # noqa: SIM115 - closed below, after the lock
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ModelError(f"{part.name} is being downloaded by another process") from None
        yield fh
    finally:
        fh.close()


def _hash_existing(part: Path, have: int) -> hashlib._Hash:
    h = hashlib.sha256()
    with open(part, "rb") as rd:
        left = have
        while left > 0 and (chunk := rd.read(min(CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    return h


def _transfer(
    opener: urllib.request.OpenerDirector,
    remote: _Remote,
    fh: IO[bytes],
    part: Path,
    token: str | None,
    on_bytes: Callable[[int], None],
) -> str:
    """Fill ``part`` (already open as ``fh``) up to ``remote.size``; returns its sha256."""
    have = os.fstat(fh.fileno()).st_size
    if have > remote.size:
        fh.truncate(0)
        have = 0
    h = _hash_existing(part, have)
    if have == remote.size:
        return h.hexdigest()
    req = urllib.request.Request(remote.url)
    if token and _same_origin(remote.url, _endpoint()):
        # The token is for the hub only: not for the CDN it sends LFS files to
        # (its URLs are signed), nor for anywhere a redirect leads.
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = opener.open(req, timeout=SOCKET_TIMEOUT)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:  # our partial file does not fit the remote one: start over
            fh.truncate(0)
            raise _Interrupted("the server refused to resume") from None
        if 500 <= exc.code < 600 or exc.code == 429:
            raise _Interrupted(f"HTTP {exc.code}") from None
        raise ModelError(
            f"download of {remote.file} failed: HTTP {exc.code}; run it again to resume"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Interrupted(str(getattr(exc, "reason", exc)) or type(exc).__name__) from None
    with resp:
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != have or int(m[2]) != remote.size - 1 or (
                m[3] != "*" and int(m[3]) != remote.size
            ):
                fh.truncate(0)
                raise _Interrupted("the server answered another range than asked")
        elif resp.status == 200:
            if have:  # the server ignored the range: start over
                fh.truncate(0)
                have = 0
                h = hashlib.sha256()
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != remote.size:
                raise ModelError(
                    f"{remote.file}: the hub said {remote.size} bytes, the download {length}"
                )
        else:
            raise ModelError(f"download of {remote.file} failed: HTTP {resp.status}")
        on_bytes(have)
        while have < remote.size:
            try:
                chunk = resp.read(min(CHUNK, remote.size - have))
            except (OSError, ValueError, http.client.HTTPException) as exc:
                raise _Interrupted(str(exc) or type(exc).__name__) from None
            if not chunk:
                raise _Interrupted(f"connection closed at {have} of {remote.size} bytes")
            _write_all(fh, chunk, part)
            h.update(chunk)
            have += len(chunk)
            on_bytes(have)
    return h.hexdigest()


def _write_all(fh: IO[bytes], data: bytes, part: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            n = fh.write(view)
            if not n:
                raise OSError("wrote nothing")
            view = view[n:]
    except OSError as exc:  # a full disk, mostly: the partial file stays for a resume
        raise ModelError(
            f"cannot write {part}: {exc.strerror or exc}; free some space and run it again"
        ) from None


def _fetch(
    opener: urllib.request.OpenerDirector,
    remote: _Remote,
    dest: Path,
    want_sha: str | None,
    token: str | None,
    retries: int,
    on_bytes: Callable[[int], None],
) -> None:
    part = dest.with_name(dest.name + ".part")
    with _locked(part) as fh:
        try:
            got = _transfer_with_retries(opener, remote, fh, part, token, retries, on_bytes)
        except ModelError:
            if part.is_file() and part.stat().st_size == 0:  # nothing worth resuming
                part.unlink()
            raise
        size = part.stat().st_size
        if size != remote.size or (want_sha is not None and got != want_sha):
            part.unlink(missing_ok=True)
            why = (
                f"{size} bytes but {remote.size} expected"
                if size != remote.size
                else f"sha256 {got[:12]}… but {(want_sha or '')[:12]}… expected"
            )
            raise ModelError(f"{dest.name} is corrupt: {why}; the partial file was deleted")
        os.replace(part, dest)


def _transfer_with_retries(
    opener: urllib.request.OpenerDirector,
    remote: _Remote,
    fh: IO[bytes],
    part: Path,
    token: str | None,
    retries: int,
    on_bytes: Callable[[int], None],
) -> str:
    attempt = 0
    while True:
        try:
            return _transfer(opener, remote, fh, part, token, on_bytes)
        except _Interrupted as exc:
            if attempt >= retries:
                have = os.fstat(fh.fileno()).st_size
                raise ModelError(
                    f"download of {PurePosixPath(remote.file).name} interrupted at {have} of "
                    f"{remote.size} bytes ({exc}); run it again to resume"
                ) from None
            time.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
            attempt += 1


def download_model(
    ref: str | ResolvedModel,
    models_dir: Path,
    *,
    progress: Progress | None = None,
    token: str | None = None,
    retries: int = 3,
) -> Path:
    """Download a catalog or hf:// model into ``models_dir``; returns the (first) GGUF path."""
    resolved = ref if isinstance(ref, ResolvedModel) else resolve_model(ref, models_dir)
    name = resolved.name
    reported = 0
    total: int | None = resolved.size_bytes

    def report(p: DownloadProgress) -> None:
        nonlocal reported
        reported = p.downloaded_bytes
        if progress is not None:
            progress(p)

    try:
        if resolved.path is not None:
            if progress is not None:
                size = sum(p.stat().st_size for p in split_parts(resolved.path))
                report(DownloadProgress(name, size, size, done=True))
            return resolved.path
        hf = resolved.hf
        if hf is None:
            raise ModelError(f"{resolved.ref!r} is a local file; there is nothing to download")
        token = token if token is not None else _default_token()
        files = split_files(hf.file)
        remotes = [_metadata(hf.repo, f, hf.revision, token) for f in files]
        total = sum(r.size for r in remotes)
        entry = resolved.entry
        if (
            entry is not None
            and not entry.size_approx
            and len(remotes) == 1
            and remotes[0].size != entry.size_bytes
        ):
            raise ModelError(
                f"the hub's {hf.file} has {remotes[0].size} bytes, the catalog says "
                f"{entry.size_bytes}: not the file the catalog means"
            )
        models_dir.mkdir(parents=True, exist_ok=True)
        dests = [local_file_for(f, models_dir) for f in files]
        complete = partial = 0
        for remote, dest in zip(remotes, dests, strict=True):
            part = dest.with_name(dest.name + ".part")
            if dest.is_file() and dest.stat().st_size == remote.size:
                complete += remote.size
            elif part.is_file():
                partial += min(part.stat().st_size, remote.size)
        free = shutil.disk_usage(models_dir).free
        if total - complete - partial > free:
            raise ModelError(
                f"{name} needs {(total - complete - partial) / 1e9:.2f} GB more, "
                f"{models_dir} has {free / 1e9:.2f} GB free"
            )
        opener = _opener()
        done_bytes = complete
        last = -1.0
        # Parts are fetched in order, so counting only finished parts here
        # keeps the reported numbers from going backwards.
        report(DownloadProgress(name, complete, total))
        for i, (remote, dest) in enumerate(zip(remotes, dests, strict=True)):
            if dest.is_file() and dest.stat().st_size == remote.size:
                continue  # counted in `complete`
            # The catalog pins a single file's sha256; otherwise trust the hub's.
            want = entry.sha256 if entry is not None and entry.sha256 and i == 0 else None
            want = want or remote.sha256

            def on_bytes(have: int, base: int = done_bytes) -> None:
                nonlocal last
                now = time.monotonic()
                if now - last >= PROGRESS_INTERVAL:
                    last = now
                    report(DownloadProgress(name, base + have, total))

            _fetch(opener, remote, dest, want, token, max(0, retries), on_bytes)
            done_bytes += remote.size
        report(DownloadProgress(name, total, total, done=True))
        return dests[0]
    except ModelError as exc:
        report(DownloadProgress(name, reported, total, done=True, error=str(exc)))
        raise


def remove_model(name: str, models_dir: Path) -> list[Path]:
    """Delete a downloaded model (every part, and partial files); returns what was removed."""
    base = models_dir.resolve()
    first: Path | None = None
    for cand in (models_dir / f"{name}.gguf", models_dir / name):
        if cand.suffix == ".gguf" and (
            cand.is_file() or cand.with_name(cand.name + ".part").is_file()
        ):
            first = split_parts(cand)[0]
            break
    if first is None:
        resolved = resolve_model(name, models_dir)
        if resolved.path is not None:
            first = resolved.path
        elif resolved.hf is not None:
            first = local_file_for(resolved.hf.file, models_dir)
        else:
            raise ModelError(f"{name!r} is not a downloaded model in {models_dir}")
    if first.resolve().parent != base:
        raise ModelError(f"{name!r} is at {first}, not a downloaded model in {models_dir}")
    removed = []
    for p in split_parts(first):
        for q in (p, p.with_name(p.name + ".part")):
            if q.is_file():
                q.unlink()
                removed.append(q)
    if not removed:
        raise ModelError(f"{name!r} is not downloaded in {models_dir}: nothing to remove")
    return removed
