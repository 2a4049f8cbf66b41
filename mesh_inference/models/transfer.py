"""Model files between peers: a node without the mesh model's GGUF copies it from one that has it.

Public API::

    await serve_fetch(first_frame, writer, held)     # the holder: held(sha256) -> HeldFile | None
    server = FileServer(held); await server.serve(peer_id, first_frame, writer)   # ≤ 2 at once
    path = await fetch_model(open_stream, sha256, dest, expected_size=None, progress=None)
    target = fetch_target(ref, members, models_dir, self_id, prefer=None)
        # FetchTarget (what, where to, from whom) | Unfetchable (why not) | None (no holder yet)
    fetcher = ModelFetcher(open_stream=f(peer_id, payload), on_change=f(), on_done=f(target))
    fetcher.want(ref, target); fetcher.status -> FetchStatus | None; await fetcher.close()

The wire (one QUIC stream per transfer, only between authenticated
members): the fetcher opens the stream with a FetchModel frame
``{"sha256", "offset"}``; the holder answers a ModelFile frame ``{"size"}``
and then the file's raw bytes from ``offset`` to the end, then FIN -- or an
Error frame ``{"reason"}``. A holder serves exactly one file: the mesh
model it currently holds, and only if its indexed sha256 is the one asked
for; a request never names a path. It reads the file in a thread, chunk by
chunk, and writes as the stream's credit allows (``drain``).

The fetcher writes ``<dest>.part`` (locked against a second fetcher),
resumes from its size with a new request, hashes what it already has and
then every byte as it arrives, and renames the file into place only when
the whole file's sha256 is the one asked for; a mismatch deletes the
partial file. Every failure is a :class:`TransferError` (a ``ModelError``)
with a message meant for a person: :class:`TransferInterrupted` keeps the
partial file for a resume, :class:`PeerRefused` carries the holder's reason.

:class:`ModelFetcher` owns the one background fetch of a node: it starts,
follows and cancels it as the mesh model changes, tries the holders in
turn with back-off, and reports progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from mesh_inference.core.dcf import Frame, FrameDecoder, FrameEncoder, MessageType, ProtocolError
from mesh_inference.core.messages import (
    SHA256_HEX,
    ErrorMessage,
    FetchModel,
    ModelFile,
    NodeInfo,
    decode_payload,
    encode_payload,
)
from mesh_inference.models.refs import ModelError, load_catalog, local_copy_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # read from disk / written to disk at a time
HEAD_LIMIT = 4096  # the answer's head frame is a few bytes of JSON
HEAD_TIMEOUT = 30.0  # for the holder's answer
STALL_TIMEOUT = 60.0  # without a byte, a transfer counts as interrupted
PROGRESS_INTERVAL = 0.25
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
MAX_SERVING = 2  # transfers a holder serves at once; more are refused ("busy")

T = TypeVar("T")
OpenStream = Callable[[bytes], Awaitable[tuple[asyncio.StreamReader, Any]]]
Progress = Callable[[int, int], None]  # (bytes here, total)


class TransferError(ModelError):
    """A model file could not be fetched from a peer (the message says why)."""


class TransferInterrupted(TransferError):
    """The transfer stopped early; the partial file is kept and a new request resumes it."""


class PeerRefused(TransferError):
    """The holder answered with a reason instead of the file."""


@dataclass(frozen=True)
class HeldFile:
    path: Path
    size: int  # as indexed: a file that changed since is not served


def _now_us() -> int:
    return time.time_ns() // 1000


# ---------------------------------------------------------------------------- holder


async def serve_fetch(
    first: Frame,
    writer: Any,
    held: Callable[[str], HeldFile | None],
    *,
    busy: bool = False,
) -> int:
    """Answer one FetchModel stream; returns the file bytes sent.

    ``held(sha256)`` is the file this node holds with that digest (its
    current mesh model, indexed), or None. Errors go back as an Error frame.
    """
    enc = FrameEncoder()

    def refuse(reason: str) -> int:
        log.info("refused a model fetch: %s", reason)
        writer.write(enc.encode(MessageType.ERROR, encode_payload(ErrorMessage(reason)), _now_us()))
        writer.write_eof()
        return 0

    try:
        req = decode_payload(first.type, first.payload)
    except ProtocolError as exc:
        return refuse(f"bad request: {exc}"[:500])
    if not isinstance(req, FetchModel):
        return refuse(f"a model-file stream starts with FetchModel, not {first.type.name}")
    if busy:
        return refuse("busy: serving other transfers; try another holder or later")
    file = held(req.sha256)
    if file is None:
        return refuse(f"this node holds no model file with sha256 {req.sha256}")
    try:
        fd = await asyncio.to_thread(os.open, file.path, os.O_RDONLY)
    except OSError as exc:
        return refuse(f"cannot read the model file: {exc.strerror or exc}")
    sent = 0
    try:
        size = os.fstat(fd).st_size
        if size != file.size:
            return refuse("the model file changed since it was indexed")
        writer.write(enc.encode(MessageType.MODEL_FILE, encode_payload(ModelFile(size)),
                                _now_us()))  # fmt: skip
        pos = req.offset  # beyond the end: no bytes; the fetcher sees its .part is too long
        while pos < size:
            data = await _finish(asyncio.to_thread(os.pread, fd, min(CHUNK, size - pos), pos))
            if not data:
                raise OSError(f"the model file shrank while being sent ({pos} of {size} B)")
            writer.write(data)
            await writer.drain()
            pos += len(data)
            sent += len(data)
        writer.write_eof()
        return sent
    finally:
        os.close(fd)


class FileServer:
    """The holder's side for a node: at most ``max_serving`` transfers at once, counted."""

    def __init__(
        self, held: Callable[[str], HeldFile | None], max_serving: int = MAX_SERVING
    ) -> None:
        self._held = held
        self._max = max_serving
        self.active = 0
        self.sent_bytes = 0

    async def serve(self, peer_id: str, first: Frame, writer: Any) -> None:
        busy = self.active >= self._max
        self.active += 1
        try:
            sent = await serve_fetch(first, writer, self._held, busy=busy)
        finally:
            self.active -= 1
        self.sent_bytes += sent
        if sent:
            log.info("sent %d B of the model file to %s", sent, peer_id)


# ---------------------------------------------------------------------------- fetcher


async def _finish(aw: Awaitable[T]) -> T:
    """Await a thread's work; if cancelled, let it end first (it uses our file)."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _lock_part(part: Path) -> int:
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TransferError(f"{part.name} is being fetched by another process") from None
    return fd


def _hash_prefix(fd: int, have: int) -> hashlib._Hash:
    h = hashlib.sha256()
    pos = 0
    while pos < have:
        chunk = os.pread(fd, min(CHUNK, have - pos), pos)
        if not chunk:
            raise OSError("the partial file shrank")
        h.update(chunk)
        pos += len(chunk)
    return h


def _append(fd: int, data: bytes, h: hashlib._Hash) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError("wrote nothing")
        view = view[n:]
    h.update(data)


async def _write(fd: int, data: bytes, h: hashlib._Hash, part: Path) -> None:
    try:
        await _finish(asyncio.to_thread(_append, fd, data, h))
    except OSError as exc:  # a full disk, mostly: the partial file stays for a resume
        raise TransferError(f"cannot write {part}: {exc.strerror or exc}") from None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The holder's answer: (the file's size, file bytes that came with it)."""
    decoder = FrameDecoder(max_payload=HEAD_LIMIT)
    async with asyncio.timeout(HEAD_TIMEOUT):
        while True:
            data = await reader.read(HEAD_LIMIT)
            if not data:
                raise TransferInterrupted("the peer closed the stream without an answer")
            decoder.push(data)
            frame = decoder.next_frame()
            if frame is not None:
                break
    msg = decode_payload(frame.type, frame.payload)
    if isinstance(msg, ErrorMessage):
        raise PeerRefused(f"the peer refused: {msg.reason}")
    if not isinstance(msg, ModelFile):
        raise ProtocolError(f"answered with {frame.type.name}")
    return msg.size, decoder.take_remainder()


async def fetch_model(
    open_stream: OpenStream,
    sha256: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Copy the file with ``sha256`` from a peer into ``dest`` (via ``<dest>.part``); resumable.

    ``open_stream(first_payload)`` opens a FetchModel stream to the peer.
    """
    if not SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_part(part)
    except OSError as exc:
        raise TransferError(f"cannot write {part}: {exc.strerror or exc}") from None
    try:
        have = os.fstat(fd).st_size
        try:
            if expected_size is not None and have > expected_size:
                os.ftruncate(fd, 0)
                have = 0
            h = await _finish(asyncio.to_thread(_hash_prefix, fd, have))
        except OSError as exc:
            raise TransferError(f"cannot read {part}: {exc}") from None
        try:
            reader, writer = await open_stream(encode_payload(FetchModel(sha256, have)))
        except (KeyError, ConnectionError, OSError) as exc:
            raise TransferInterrupted(f"cannot reach the peer: {exc!r}") from None
        try:
            writer.write_eof()  # nothing more to say: the stream ends cleanly, not reset
            have = await _receive(reader, fd, h, have, part, expected_size, progress)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            raise TransferInterrupted(f"the stream broke: {exc}") from None
        except TimeoutError:
            raise TransferInterrupted("the peer stopped sending") from None
        except ProtocolError as exc:
            raise TransferError(f"the peer's answer is invalid: {exc}") from None
        finally:
            writer.close()
        got = h.hexdigest()
        if got != sha256:
            part.unlink(missing_ok=True)
            raise TransferError(
                f"{dest.name} is corrupt: sha256 {got[:12]}… but {sha256[:12]}… expected; "
                "the partial file was deleted"
            )
        try:
            await _finish(asyncio.to_thread(os.fsync, fd))
            os.replace(part, dest)
        except OSError as exc:
            raise TransferError(f"cannot move {part.name} into place: {exc}") from None
        return dest
    finally:
        os.close(fd)


async def _receive(
    reader: asyncio.StreamReader,
    fd: int,
    h: hashlib._Hash,
    have: int,
    part: Path,
    expected_size: int | None,
    progress: Progress | None,
) -> int:
    size, pending = await _read_head(reader)
    if have > size:  # not a prefix of this file: start over next time
        os.ftruncate(fd, 0)
        raise TransferInterrupted(f"{part.name} is longer than the file ({size} B); starting over")
    if expected_size is not None and size != expected_size:
        raise PeerRefused(f"the peer offers {size} B, but the model has {expected_size} B")
    free = shutil.disk_usage(part.parent).free
    if size - have > free:
        raise TransferError(
            f"{part.name} needs {(size - have) / 1e9:.2f} GB more, "
            f"{part.parent} has {free / 1e9:.2f} GB free"
        )
    buf = bytearray(pending)
    last = 0.0
    if progress is not None:
        progress(have, size)
    while True:
        if have + len(buf) > size:
            raise ProtocolError(f"the peer sent more than the {size} B it announced")
        if buf and (len(buf) >= CHUNK or have + len(buf) == size):
            data, buf = bytes(buf), bytearray()
            await _write(fd, data, h, part)
            have += len(data)
            now = time.monotonic()
            if progress is not None and (now - last >= PROGRESS_INTERVAL or have == size):
                last = now
                progress(have, size)
        async with asyncio.timeout(STALL_TIMEOUT):
            data = await reader.read(CHUNK)
        if not data:
            break
        buf += data
    if buf:
        await _write(fd, bytes(buf), h, part)
        have += len(buf)
    if have < size:
        raise TransferInterrupted(f"the stream ended at {have} of {size} B")
    return have


# ---------------------------------------------------------------------------- what to fetch


@dataclass(frozen=True)
class FetchTarget:
    ref: str
    sha256: str
    size: int
    dest: Path
    holders: tuple[str, ...]  # node ids, the preferred one first

    @property
    def key(self) -> tuple[str, str, Path]:
        return (self.ref, self.sha256, self.dest)


@dataclass(frozen=True)
class Unfetchable:
    ref: str
    reason: str


def fetch_target(
    ref: str,
    members: Iterable[NodeInfo],
    models_dir: Path,
    self_id: str,
    prefer: str | None = None,
) -> FetchTarget | Unfetchable | None:
    """What to fetch for ``ref`` and from whom: alive members holding it with a sha256.

    The digest held by ``prefer`` (the plan's host) wins, so this node ends up
    with the host's very file; else the one most holders have. None: no holder yet.
    """
    holders = [
        m for m in members
        if m.node_id != self_id and m.model == ref and m.has_model and m.model_sha256
    ]  # fmt: skip
    if not holders:
        return None
    by_sha: dict[str, list[NodeInfo]] = {}
    for m in holders:
        assert m.model_sha256 is not None
        by_sha.setdefault(m.model_sha256, []).append(m)
    pinned = next((e.sha256 for e in load_catalog() if e.name == ref and e.sha256), None)
    if pinned is not None:
        if pinned not in by_sha:
            return Unfetchable(ref, "no peer holds the file with the catalog's sha256")
        sha = pinned
    else:
        host_sha = next((m.model_sha256 for m in holders if m.node_id == prefer), None)
        sha = host_sha or max(by_sha, key=lambda d: (len(by_sha[d]), d))
    try:
        dest = local_copy_path(ref, models_dir)
    except ModelError as exc:
        return Unfetchable(ref, str(exc))
    if dest.exists():
        return Unfetchable(ref, f"{dest} exists but is not a usable copy; not overwriting it")
    chosen = sorted(by_sha[sha], key=lambda m: (m.node_id != prefer, m.node_id))
    size = max(m.model_bytes for m in chosen)
    return FetchTarget(ref, sha, size, dest, tuple(m.node_id for m in chosen))


# ---------------------------------------------------------------------------- the node's fetch

FetchState = Literal["fetching", "retrying", "done", "unsupported"]


@dataclass(frozen=True)
class FetchStatus:
    ref: str
    state: FetchState
    source: str | None = None  # the peer's node id
    bytes: int = 0
    total: int = 0
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "state": self.state, "from": self.source, "bytes": self.bytes,
                "total": self.total, "error": self.error}  # fmt: skip


class ModelFetcher:
    """This node's one background fetch of the mesh model's file.

    ``want(ref, target)`` on every re-plan: a new target cancels the old fetch
    (its partial file stays for later), the same one only refreshes its
    holders, None stops it. ``on_done(target)`` runs once the file is in place.
    """

    def __init__(
        self,
        open_stream: Callable[[str, bytes], Awaitable[tuple[asyncio.StreamReader, Any]]],
        on_change: Callable[[], None],
        on_done: Callable[[FetchTarget], None],
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
    ) -> None:
        self._open = open_stream
        self._on_change = on_change
        self._on_done = on_done
        self._delays = retry_delays
        self._target: FetchTarget | None = None
        self._task: asyncio.Task[None] | None = None
        self.status: FetchStatus | None = None
        self._logged = -1

    def want(self, ref: str | None, target: FetchTarget | Unfetchable | None) -> None:
        if isinstance(target, FetchTarget):
            if self._target is not None and self._target.key == target.key and self._task:
                self._target = target  # the holders may have changed
                return
            self._cancel()
            self._target = target
            self._task = asyncio.ensure_future(self._run(target))
            return
        self._cancel()
        if isinstance(target, Unfetchable):
            if self.status is None or self.status.error != target.reason:
                log.warning("not fetching model %s from peers: %s", target.ref, target.reason)
                self._set(FetchStatus(target.ref, "unsupported", error=target.reason))
        elif self.status is not None and not (self.status.state == "done"
                                              and self.status.ref == ref):  # fmt: skip
            self._set(None)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._target = None

    def _set(self, status: FetchStatus | None) -> None:
        self.status = status
        self._on_change()

    async def _run(self, first: FetchTarget) -> None:
        attempt = 0
        while True:
            target = self._target or first
            peer = target.holders[attempt % len(target.holders)]
            self._logged = -1
            self._set(FetchStatus(target.ref, "fetching", peer, 0, target.size))

            def progress(have: int, total: int, t: FetchTarget = target, p: str = peer) -> None:
                self._progress(t, p, have, total)

            async def open_stream(
                payload: bytes, p: str = peer
            ) -> tuple[asyncio.StreamReader, Any]:
                return await self._open(p, payload)

            try:
                await fetch_model(open_stream, target.sha256, target.dest,
                                  expected_size=target.size or None, progress=progress)
            except TransferError as exc:
                delay = self._delays[min(attempt, len(self._delays) - 1)]
                log.warning("fetching model %s from %s failed: %s (retrying in %.0f s)",
                            target.ref, peer, exc, delay)  # fmt: skip
                status = self.status or FetchStatus(target.ref, "retrying", peer)
                self._set(replace(status, state="retrying", error=str(exc)))
                await asyncio.sleep(delay)
                attempt += 1
                continue
            log.info("fetched model %s from %s into %s (sha256 verified)",
                        target.ref, peer, target.dest)  # fmt: skip
            self._set(FetchStatus(target.ref, "done", peer, target.size, target.size))
            self._task = None
            self._target = None
            self._on_done(target)
            return

    def _progress(self, target: FetchTarget, peer: str, have: int, total: int) -> None:
        pct = 100 * have // total if total else 100
        if pct // 10 != self._logged // 10:
            self._logged = pct
            log.info("fetching model %s from %s: %d%%", target.ref, peer, pct)
        self._set(FetchStatus(target.ref, "fetching", peer, have, total))

    async def close(self) -> None:
        task = self._task
        self._cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
