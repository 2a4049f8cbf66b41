"""A real local HTTP server that speaks the Hugging Face hub's file API (enough for downloads).

``running_hub()`` starts two servers on 127.0.0.1 (port 0), like the real
hub: the *hub* answers ``HEAD``/``GET /{owner}/{repo}/resolve/{revision}/{file}``
with ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256 of an LFS file),
``X-Linked-Size`` and a 302 to the *CDN*, which serves the bytes with
``Range`` support (206, 416). Errors carry the hub's ``X-Error-Code``
(RepoNotFound, EntryNotFound, RevisionNotFound, GatedRepo) so that
huggingface_hub raises its own exceptions.

Switches (set them on the ``FakeHub``): ``redirect=False`` serves the bytes
from the resolve URL itself (as for small files or a mirror); ``cut_after``
drops the connection once after that many body bytes; ``corrupt`` serves
flipped bytes under the true sha256; ``ignore_range`` answers 200 to a Range
request; ``fail_next`` lists statuses for the next byte requests (e.g. 503);
``size_override`` makes the hub announce another size for a file;
``require_token`` makes every repo gated. ``requests`` records every file
request; ``api_requests`` the paths of other ``/api/`` calls (huggingface_hub
2.x fetches ``/api/agent-harnesses`` once per process: answered empty).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

COMMIT = hashlib.sha1(b"fakehub").hexdigest()
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class Request(NamedTuple):
    # A tuple whose first three are (method, path, Range), as callers index it.
    method: str
    path: str
    range: str | None
    authorization: str | None
    server: str  # "hub" or "cdn"


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)  # "owner/repo/file" → content
    redirect: bool = True
    cut_after: int | None = None
    corrupt: bool = False
    ignore_range: bool = False
    fail_next: list[int] = field(default_factory=list)
    size_override: dict[str, int] = field(default_factory=dict)  # "owner/repo/file" → size
    require_token: str | None = None
    requests: list[Request] = field(default_factory=list)  # file API and CDN
    api_requests: list[str] = field(default_factory=list)  # paths under /api/
    url: str = ""
    cdn_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: str, file: str, data: bytes) -> None:
        self.files[f"{repo}/{file}"] = data

    def byte_requests(self) -> list[Request]:
        """The GETs that carried file bytes (the CDN's, or the hub's without redirects)."""
        return [
            r for r in self.requests
            if r.method == "GET" and (r.server == "cdn" or not self.redirect)
        ]

    def _by_sha(self, sha: str) -> bytes | None:
        for data in self.files.values():
            if hashlib.sha256(data).hexdigest() == sha:
                return data
        return None


class _Base(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub
    server_name_: str

    def log_message(self, *args: object) -> None:
        pass

    def _record(self) -> None:
        with self.hub.lock:
            self.hub.requests.append(Request(
                self.command, self.path, self.headers.get("Range"),
                self.headers.get("Authorization"), self.server_name_,
            ))

    def _empty(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve_bytes(self, data: bytes) -> None:
        hub = self.hub
        with hub.lock:
            status = hub.fail_next.pop(0) if hub.fail_next else None
        if status is not None:
            self._empty(status, {})
            return
        body = bytes(b ^ 0xFF for b in data) if hub.corrupt else data
        rng = None if hub.ignore_range else self.headers.get("Range")
        m = _RANGE.match(rng or "")
        start, end = 0, len(body) - 1
        if m:
            start = int(m[1])
            end = min(int(m[2]), end) if m[2] else end
            if start >= len(body) or start > end:
                self._empty(416, {"Content-Range": f"bytes */{len(body)}"})
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start : end + 1]
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if self.command == "HEAD":
            return
        with hub.lock:
            cut, hub.cut_after = hub.cut_after, None
        if cut is not None:
            self.wfile.write(chunk[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)


class _HubHandler(_Base):
    server_name_ = "hub"

    def do_HEAD(self) -> None:
        self._resolve()

    def do_GET(self) -> None:
        if self.path.startswith("/api/"):
            with self.hub.lock:
                self.hub.api_requests.append(self.path)
            if self.path.split("?")[0] == "/api/agent-harnesses":
                body = json.dumps({"standardEnvVars": [], "harnesses": {}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._empty(404, {})
            return
        self._resolve()

    def _resolve(self) -> None:
        self._record()
        hub = self.hub
        parts = [urllib.parse.unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
        if len(parts) < 5 or parts[2] != "resolve":
            self._empty(404, {"X-Error-Code": "RepoNotFound"})
            return
        repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if not any(k.startswith(repo + "/") for k in hub.files):
            self._empty(404, {"X-Error-Code": "RepoNotFound"})
            return
        if hub.require_token is not None and (
            self.headers.get("Authorization") != f"Bearer {hub.require_token}"
        ):
            self._empty(401, {"X-Error-Code": "GatedRepo"})
            return
        if revision not in ("main", COMMIT):
            self._empty(404, {"X-Error-Code": "RevisionNotFound"})
            return
        data = hub.files.get(f"{repo}/{file}")
        if data is None:
            self._empty(404, {"X-Error-Code": "EntryNotFound"})
            return
        sha = hashlib.sha256(data).hexdigest()
        size = hub.size_override.get(f"{repo}/{file}", len(data))
        common = {
            "X-Repo-Commit": COMMIT,
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(size),
            # The git blob id, as the real hub sends beside X-Linked-Etag.
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
        }
        if hub.redirect:
            common["Location"] = f"{hub.cdn_url}/cdn/{sha}?sig=fake"
            self._empty(302, common)
            return
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in common.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return
        self._serve_bytes(data)


class _CdnHandler(_Base):
    server_name_ = "cdn"

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        m = re.match(r"^/cdn/([0-9a-f]{64})(\?.*)?$", self.path)
        data = self.hub._by_sha(m[1]) if m else None
        if data is None:
            self._empty(404, {})
            return
        self._serve_bytes(data)


def _serve(handler: type[_Base], hub: FakeHub) -> ThreadingHTTPServer:
    cls = type(handler.__name__, (handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), cls)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@contextmanager
def running_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    servers = [_serve(_HubHandler, hub), _serve(_CdnHandler, hub)]
    hub.url = f"http://127.0.0.1:{servers[0].server_address[1]}"
    hub.cdn_url = f"http://127.0.0.1:{servers[1].server_address[1]}"
    try:
        yield hub
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
