"""Continuing a generation after its upstream died: the bookkeeping, without I/O.

Public API::

    j = StreamJournal("chat" | "completion", request_body)   # the validated request
    out = j.feed(upstream_bytes)      # SSE bytes for the client (complete events only)
    j.complete                        # the upstream ended properly (data: [DONE])
    body = j.continuation()           # the request that continues it, or None
    j.begin_continuation()            # the next upstream answers that request
    j.error_event(message)            # the SSE error event that ends a stream we give up on

Why this works (measured on llama-server with SmolLM2, temperature 0): a
chat request whose last message is an assistant message with the text
streamed so far continues that message (llama-server's assistant prefill),
and when the cut is at a token boundary -- a streamed chunk is one token --
prefix + continuation equals the uninterrupted answer, 10 cuts out of 10.
llama-server echoes the prefill at the start of its first content chunk;
the journal strips it (if an engine does not echo, nothing is stripped). For
``/v1/completions`` the prompt is extended with the text so far. The
continuation asks for ``max_tokens`` minus the content chunks already sent.

Continuation chunks are rewritten to carry the first answer's ``id``,
``created`` and ``model``, and its role-only opening chunk is dropped, so
the client sees one stream. Not resumable (an error event instead): ``n`` > 1,
a list of prompts, or nothing left to generate but no end seen.
"""

from __future__ import annotations

import copy
import json
from typing import Any

DONE = b"data: [DONE]"
_SEP = b"\n\n"


class StreamJournal:
    """What a streamed answer has sent so far, and how to ask for the rest."""

    def __init__(self, kind: str, request: dict[str, Any]) -> None:
        if kind not in ("chat", "completion"):
            raise ValueError(f"unknown request kind {kind!r}")
        self.kind = kind
        self.request = request
        self.text = ""  # content the client has received
        self.tokens = 0  # content chunks the client has received (one token each)
        self.complete = False  # [DONE] forwarded
        self.finished = False  # a finish_reason was forwarded
        self.continuations = 0
        self._buf = b""
        self._ident: dict[str, Any] = {}  # id, created, model of the first answer
        self._echo: str | None = None  # prefix the continuation's engine may echo
        self._echo_seen = ""

    # ------------------------------------------------------------------ upstream bytes
    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the complete SSE events to send on (maybe rewritten)."""
        # On the whole held-back part: a CRLF may be split between two reads.
        self._buf = (self._buf + data).replace(b"\r\n", b"\n")
        out: list[bytes] = []
        while (end := self._buf.find(_SEP)) >= 0:
            event, self._buf = self._buf[:end], self._buf[end + 2 :]
            forwarded = self._event(event)
            if forwarded is not None:
                out.append(forwarded + _SEP)
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        if self.complete:
            return None  # nothing after [DONE]
        data = _data_of(event)
        if data is None:
            return event  # comments and other fields pass through
        if data.strip() == b"[DONE]":
            self.complete = True
            return DONE
        try:
            chunk = json.loads(data)
        except ValueError:
            return event
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            return event  # an error event, usage-only chunk, ...: as it came
        if self.continuations == 0:
            self._remember_ident(chunk)
            self._account(chunk)
            return event
        return self._rewrite(chunk)

    def _remember_ident(self, chunk: dict[str, Any]) -> None:
        if not self._ident:
            self._ident = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}

    def _choice(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return choices[0]
        return None

    def _content_of(self, choice: dict[str, Any]) -> str | None:
        if self.kind == "chat":
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
        else:
            content = choice.get("text")
        return content if isinstance(content, str) else None

    def _account(self, chunk: dict[str, Any]) -> None:
        choice = self._choice(chunk)
        if choice is None:
            return
        content = self._content_of(choice)
        if content:
            self.text += content
            self.tokens += 1
        if choice.get("finish_reason") is not None:
            self.finished = True

    def _rewrite(self, chunk: dict[str, Any]) -> bytes | None:
        choice = self._choice(chunk)
        if choice is None:
            return _encode(chunk | self._ident)
        content = self._content_of(choice)
        if content is not None and self._echo is not None:
            content = self._strip_echo(content)
            if content is None:
                return None  # all of it was the echo, or undecided yet
            self._set_content(choice, content)
        elif self.kind == "chat" and content is None and choice.get("finish_reason") is None:
            delta = choice.get("delta")
            if isinstance(delta, dict) and set(delta) <= {"role", "content"}:
                return None  # the continuation's role-only opening chunk
        self._account(chunk)
        return _encode(chunk | self._ident)

    def _strip_echo(self, content: str) -> str | None:
        """Drop the engine's echo of the prefill; None while it cannot tell yet."""
        assert self._echo is not None
        seen = self._echo_seen + content
        if len(seen) < len(self._echo) and self._echo.startswith(seen):
            self._echo_seen = seen
            return None
        echo, self._echo, self._echo_seen = self._echo, None, ""
        # An engine that does not echo the prefill: everything is new.
        rest = seen[len(echo) :] if seen.startswith(echo) else seen
        return rest or None

    def _set_content(self, choice: dict[str, Any], content: str) -> None:
        if self.kind == "chat":
            choice["delta"] = {**choice.get("delta", {}), "content": content}
        else:
            choice["text"] = content

    # ------------------------------------------------------------------ after a break
    def continuation(self) -> dict[str, Any] | None:
        """The request that continues the answer, or None if it cannot be continued."""
        if self.complete:
            return None
        req = copy.deepcopy(self.request)
        if req.get("n", 1) != 1:
            return None
        limit = req.get("max_tokens")
        if isinstance(limit, int):
            if limit - self.tokens < 1:
                return None  # all tokens sent but the end was lost
            req["max_tokens"] = limit - self.tokens
        req["stream"] = True
        if not self.text:
            return req  # nothing sent yet: the same request again
        if self.kind == "chat":
            messages = req["messages"]
            last = messages[-1] if messages else None
            if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(
                last.get("content"), str
            ):
                last["content"] += self.text  # the client's own prefill, grown
            else:
                messages.append({"role": "assistant", "content": self.text})
        else:
            prompt = req.get("prompt")
            if not isinstance(prompt, str):
                return None
            req["prompt"] = prompt + self.text
        return req

    def begin_continuation(self) -> None:
        """What comes next answers :meth:`continuation`'s request."""
        self.continuations += 1
        self._buf = b""  # a partial event of the dead upstream is gone with it
        if self.text and self.kind == "chat":
            last = self.request["messages"][-1]
            own = (
                last["content"]
                if isinstance(last, dict) and last.get("role") == "assistant"
                and isinstance(last.get("content"), str)
                else ""
            )
            self._echo = own + self.text
        else:
            self._echo = None
        self._echo_seen = ""

    def error_event(self, message: str, code: str = "stream_broken") -> bytes:
        err = {"error": {"message": message, "type": "server_error", "code": code}}
        return b"data: " + json.dumps(err).encode() + _SEP


def _data_of(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one SSE event, None if it has none."""
    lines = [ln for ln in event.split(b"\n") if ln.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(ln[5:].removeprefix(b" ") for ln in lines)


def _encode(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode()
