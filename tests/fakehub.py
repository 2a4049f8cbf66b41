"""A real local HTTP server that speaks the Hugging Face hub's file API (enough for downloads).

``HEAD/GET /{owner}/{repo}/resolve/{revision}/{file}`` with ETag (the
sha256, as the hub sends for LFS files), X-Repo-Commit, Content-Length, and
Range → 206. Switches: ``cut_after`` drops the connection once after that
many body bytes; ``corrupt`` serves flipped bytes with the original ETag.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)  # "owner/repo/file" → content
    cut_after: int | None = None
    corrupt: bool = False
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range
    auth: list[str | None] = field(default_factory=list)  # Authorization of each GET
    url: str = ""

    def add(self, repo: str, file: str, data: bytes) -> None:
        self.files[f"{repo}/{file}"] = data


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _lookup(self) -> bytes | None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            return hub.files.get("/".join(parts[:2] + parts[4:]))

        def _head(self, data: bytes, status: int = 200, length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()

        def do_HEAD(self) -> None:
            hub.requests.append(("HEAD", self.path, self.headers.get("Range")))
            data = self._lookup()
            if data is None:
                self.send_error(404)
                return
            self._head(data)

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            hub.requests.append(("GET", self.path, rng))
            hub.auth.append(self.headers.get("Authorization"))
            data = self._lookup()
            if data is None:
                self.send_error(404)
                return
            body = bytes(b ^ 0xFF for b in data) if hub.corrupt else data
            start = 0
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
            chunk = body[start:]
            if start:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
            else:
                self._head(data, 200, len(chunk))
            if hub.cut_after is not None:
                self.wfile.write(chunk[: hub.cut_after])
                self.wfile.flush()
                hub.cut_after = None
                self.close_connection = True
                return
            self.wfile.write(chunk)

    return Handler


@contextmanager
def running_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
