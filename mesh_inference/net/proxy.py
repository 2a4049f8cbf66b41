"""HTTP requests forwarded to the host over a QUIC stream (DCF Task/Result/Body).

Client side: :func:`forward_request` writes a Task frame, the body as Body
frames, then FIN; it returns the Result head and an iterator over the
response's Body frames *as they arrive* (SSE tokens are not buffered).
Server side (the host): :func:`serve_task` reads the Task (the transport may
already have decoded its first frame), calls a handler, and streams the
answer back. Works over any (StreamReader, writer) pair. Which requests a
handler accepts is its business: the node passes
``mesh_inference.api.openai.make_task_handler``, which serves ``/v1/*`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mesh_inference.core.dcf import Frame, FrameDecoder, FrameEncoder, MessageType, ProtocolError
from mesh_inference.core.messages import (
    ErrorMessage,
    ResultHead,
    TaskHead,
    decode_payload,
    encode_payload,
)

log = logging.getLogger(__name__)

BODY_CHUNK = 64 << 10
MAX_BODY = 8 << 20
READ = 64 << 10
FORWARDED_HEADERS = frozenset(
    {"content-type", "accept", "authorization", "x-request-id", "cache-control", "x-mesh-hops",
     "x-mesh-replay"}
)


class ProxyError(Exception):
    pass


@dataclass(frozen=True)
class ProxiedResponse:
    """An HTTP answer whose body arrives chunk by chunk (SSE tokens are not buffered)."""

    status: int
    headers: list[tuple[str, str]]
    body_iter: AsyncIterator[bytes]

    @classmethod
    def of_bytes(cls, status: int, headers: list[tuple[str, str]], data: bytes) -> ProxiedResponse:
        """An answer whose whole body is already here."""
        return cls(status, headers, _single(data))

    async def aclose(self) -> None:
        """Release the body's upstream (a connection to the engine or the host)."""
        aclose = getattr(self.body_iter, "aclose", None)
        if aclose is not None:
            await aclose()


Handler = Callable[[TaskHead, bytes], Awaitable[ProxiedResponse]]


def _now_us() -> int:
    return time.time_ns() // 1000


def filter_headers(headers: Any) -> tuple[tuple[str, str], ...]:
    items = headers.items() if hasattr(headers, "items") else headers
    return tuple((k.lower(), v) for k, v in items if k.lower() in FORWARDED_HEADERS)


class _FrameReader:
    def __init__(self, reader: Any, decoder: FrameDecoder) -> None:
        self._reader = reader
        self._decoder = decoder
        self._frames: list[Frame] = []
        self._eof = False

    async def next(self) -> Frame | None:
        while not self._frames:
            if self._eof:
                return None
            data = await self._reader.read(READ)
            if not data:
                self._eof = True
                self._decoder.close()
                return None
            self._frames.extend(self._decoder.feed(data))
        return self._frames.pop(0)


async def _write_body(writer: Any, enc: FrameEncoder, body: bytes) -> None:
    for i in range(0, len(body), BODY_CHUNK):
        writer.write(enc.encode(MessageType.BODY, body[i : i + BODY_CHUNK], _now_us()))
        await writer.drain()


async def forward_request(
    reader: Any,
    writer: Any,
    *,
    method: str,
    path: str,
    headers: Any,
    body: bytes,
) -> ProxiedResponse:
    enc = FrameEncoder()
    head = TaskHead(method, path, filter_headers(headers))
    try:
        writer.write(enc.encode(MessageType.TASK, encode_payload(head), _now_us()))
        await _write_body(writer, enc, body)
        writer.write_eof()
    except (ConnectionError, OSError) as exc:
        writer.close()
        raise ProxyError(f"host connection failed: {exc}") from None
    frames = _FrameReader(reader, FrameDecoder(max_payload=BODY_CHUNK * 2))
    try:
        first = await frames.next()
        if first is None:
            raise ProxyError("host closed the stream without an answer")
        msg = decode_payload(first.type, first.payload)
        if isinstance(msg, ErrorMessage):
            raise ProxyError(msg.reason)
        if not isinstance(msg, ResultHead):
            raise ProxyError(f"host answered with {first.type.name}")
    except (ProtocolError, ConnectionError, OSError) as exc:
        writer.close()
        raise ProxyError(f"bad answer from host: {exc}") from None
    except BaseException:
        writer.close()
        raise

    async def body_iter() -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    frame = await frames.next()
                except (ProtocolError, ConnectionError, OSError) as exc:
                    raise ProxyError(f"stream from host broke: {exc}") from None
                if frame is None:
                    return
                if frame.type == MessageType.BODY:
                    yield frame.payload
                elif frame.type == MessageType.ERROR:
                    try:
                        err = decode_payload(frame.type, frame.payload)
                        reason = err.reason if isinstance(err, ErrorMessage) else "error"
                    except ProtocolError:
                        reason = "malformed error frame"
                    raise ProxyError(f"host: {reason}")
                else:
                    raise ProxyError(f"unexpected {frame.type.name} in a response body")
        finally:
            writer.close()

    return ProxiedResponse(msg.status, list(msg.headers), body_iter())


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


async def serve_task(
    reader: Any, writer: Any, handler: Handler, *, first: Frame | None = None
) -> None:
    frames = _FrameReader(
        reader, FrameDecoder(max_payload=BODY_CHUNK * 2, first_seq=1 if first is not None else 0)
    )
    enc = FrameEncoder()
    try:
        task_frame = first if first is not None else await frames.next()
        if task_frame is None or task_frame.type != MessageType.TASK:
            raise ProtocolError("request stream must start with a Task frame")
        head = decode_payload(task_frame.type, task_frame.payload)
        assert isinstance(head, TaskHead)
        body = bytearray()
        while (frame := await frames.next()) is not None:
            if frame.type != MessageType.BODY:
                raise ProtocolError(f"unexpected {frame.type.name} in a request body")
            body += frame.payload
            if len(body) > MAX_BODY:
                resp = ProxiedResponse.of_bytes(
                    413,
                    [("content-type", "application/json")],
                    b'{"error":{"message":"request body too large",'
                    b'"type":"invalid_request_error",'
                    b'"code":"body_too_large"}}',
                )
                break
        else:
            resp = await handler(head, bytes(body))
    except (ProtocolError, ConnectionError, OSError) as exc:
        log.warning("bad proxied request: %s", exc)
        try:
            writer.write(
                enc.encode(
                    MessageType.ERROR,
                    encode_payload(ErrorMessage(str(exc).replace("\n", " ")[:500])),
                    _now_us(),
                )
            )
            writer.write_eof()
        except Exception:
            writer.close()
        return
    writer.write(
        enc.encode(
            MessageType.RESULT,
            encode_payload(ResultHead(resp.status, tuple((k.lower(), v) for k, v in resp.headers))),
            _now_us(),
        )
    )
    try:
        async for chunk in resp.body_iter:
            for i in range(0, len(chunk), BODY_CHUNK):
                writer.write(enc.encode(MessageType.BODY, chunk[i : i + BODY_CHUNK], _now_us()))
            await writer.drain()
        writer.write_eof()
    except Exception as exc:
        # The upstream broke mid-answer: say so, so the client does not take a
        # truncated answer for a whole one.
        log.warning("proxied response broke: %r", exc)
        try:
            reason = f"upstream broke: {exc!r}".replace("\n", " ")[:500]
            writer.write(enc.encode(MessageType.ERROR, encode_payload(ErrorMessage(reason)),
                                    _now_us()))
            writer.write_eof()
        except Exception:
            writer.close()
    finally:
        await resp.aclose()


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data
