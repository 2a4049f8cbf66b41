"""core/resume.py: the journal of a streamed answer and the request that continues it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_inference.core.resume import StreamJournal

CHAT = {"messages": [{"role": "user", "content": "Tell me about Paris."}], "stream": True,
        "max_tokens": 10}
TOKENS = ["Paris", " is", " a", " city", " of", " light", "."]


def chat_chunk(content: str | None = None, *, role: bool = False, finish: str | None = None,
               ident: str = "chatcmpl-1", created: int = 100) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = None
    if content is not None:
        delta["content"] = content
    chunk = {"id": ident, "created": created, "model": "m", "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def answer(tokens: list[str], **kw: Any) -> bytes:
    return chat_chunk(role=True, **kw) + b"".join(chat_chunk(t, **kw) for t in tokens)


def events(data: bytes) -> list[dict[str, Any] | str]:
    out: list[dict[str, Any] | str] = []
    for ev in data.split(b"\n\n"):
        if ev.startswith(b"data: "):
            body = ev[6:]
            out.append("[DONE]" if body == b"[DONE]" else json.loads(body))
        elif ev:
            out.append(ev.decode())
    return out


def text_of(data: bytes) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events(data) if isinstance(e, dict) and "choices" in e
    )


def test_an_unbroken_stream_passes_through_unchanged() -> None:
    j = StreamJournal("chat", CHAT)
    upstream = answer(TOKENS) + chat_chunk(finish="stop") + b"data: [DONE]\n\n"
    assert j.feed(upstream) == upstream
    assert j.complete and j.finished and j.text == "".join(TOKENS) and j.tokens == len(TOKENS)
    assert j.continuation() is None  # nothing to continue
    assert j.feed(chat_chunk("late")) == b""  # nothing after [DONE]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=60))
def test_any_split_of_the_bytes_gives_the_same_events(cuts: list[int]) -> None:
    upstream = (answer(TOKENS) + b": keep-alive\n\n" + chat_chunk(finish="stop")
                + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
    j = StreamJournal("chat", CHAT)
    out, pos = b"", 0
    for n in cuts:
        out += j.feed(upstream[pos : pos + n])
        pos += n
    out += j.feed(upstream[pos:])
    assert out == upstream.replace(b"\r\n", b"\n")
    assert j.text == "".join(TOKENS) and j.complete


def test_a_half_event_is_held_back_until_it_is_whole() -> None:
    j = StreamJournal("chat", CHAT)
    whole = chat_chunk("Paris")
    assert j.feed(whole[:20]) == b""
    assert j.text == ""
    assert j.feed(whole[20:]) == whole and j.text == "Paris"


def test_chat_continuation_puts_the_text_so_far_in_the_assistant_turn() -> None:
    j = StreamJournal("chat", CHAT)
    j.feed(answer(TOKENS[:3]))
    req = j.continuation()
    assert req is not None
    assert req["messages"][-1] == {"role": "assistant", "content": "Paris is a"}
    assert req["messages"][:-1] == CHAT["messages"] and req["max_tokens"] == 7
    assert CHAT["messages"][-1]["role"] == "user"  # the original request is untouched


def test_a_clients_own_prefill_grows_instead_of_a_second_assistant_turn() -> None:
    req = {**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "content": "Well,"}]}
    j = StreamJournal("chat", req)
    j.feed(answer([" Paris", " is"]))
    cont = j.continuation()
    assert cont is not None and len(cont["messages"]) == 2
    assert cont["messages"][-1]["content"] == "Well, Paris is"
    j.begin_continuation()
    # The engine echoes the whole prefill (the client's and ours) before the new token.
    out = j.feed(chat_chunk(role=True, ident="x") + chat_chunk("Well, Paris is a", ident="x"))
    assert text_of(out) == " a"


def test_completion_continuation_extends_the_prompt() -> None:
    j = StreamJournal("completion", {"prompt": "Once upon", "stream": True})
    chunk = {"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "text": " a time",
                                                                 "finish_reason": None}]}
    j.feed(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    cont = j.continuation()
    assert cont is not None and cont["prompt"] == "Once upon a time" and "max_tokens" not in cont
    j.begin_continuation()
    more = {**chunk, "id": "d", "choices": [{"index": 0, "text": ",", "finish_reason": None}]}
    out = j.feed(b"data: " + json.dumps(more).encode() + b"\n\n")
    (ev,) = events(out)
    assert isinstance(ev, dict) and ev["id"] == "c" and ev["choices"][0]["text"] == ","


@pytest.mark.parametrize(
    ("kind", "request_body", "sent"),
    [
        ("chat", {**CHAT, "n": 2}, TOKENS[:2]),  # several choices: not resumable
        ("chat", {**CHAT, "max_tokens": 3}, TOKENS[:3]),  # all tokens sent, only the end lost
        ("completion", {"prompt": ["a", "b"], "stream": True}, ["x"]),  # a list of prompts
    ],
    ids=["n=2", "nothing left", "prompt list"],
)
def test_what_cannot_be_continued_says_so(
    kind: str, request_body: dict[str, Any], sent: list[str]
) -> None:
    j = StreamJournal(kind, request_body)
    if kind == "chat":
        j.feed(answer(sent))
    else:
        chunk = {"choices": [{"index": 0, "text": sent[0], "finish_reason": None}]}
        j.feed(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    assert j.continuation() is None
    (err,) = events(j.error_event("gone"))
    assert isinstance(err, dict) and err["error"]["code"] == "stream_broken"


def test_nothing_sent_yet_retries_the_same_request() -> None:
    j = StreamJournal("chat", CHAT)
    j.feed(chat_chunk(role=True))
    assert j.continuation() == CHAT


def test_the_continuation_reads_as_the_same_stream() -> None:
    j = StreamJournal("chat", CHAT)
    first = j.feed(answer(TOKENS[:3]) + b"data: {\"choi")  # cut mid-event
    j.continuation()
    j.begin_continuation()
    # The echo of "Paris is a" arrives split over two chunks, then new tokens.
    second = j.feed(
        answer(["Paris is", " a city"], ident="other", created=999)
        + chat_chunk(" of", ident="other", created=999)
        + chat_chunk(finish="stop", ident="other", created=999)
        + b"data: [DONE]\n\n"
    )
    assert text_of(first + second) == "Paris is a city of"
    evs = [e for e in events(second) if isinstance(e, dict)]
    assert all(e["id"] == "chatcmpl-1" and e["created"] == 100 for e in evs)
    assert not any("role" in e["choices"][0]["delta"] for e in evs)  # no second opening
    assert events(second)[-1] == "[DONE]" and j.complete and j.tokens == 5


def test_an_engine_that_does_not_echo_loses_nothing() -> None:
    j = StreamJournal("chat", CHAT)
    j.feed(answer(TOKENS[:2]))
    j.continuation()
    j.begin_continuation()
    out = j.feed(chat_chunk(" a") + chat_chunk(" city"))
    assert text_of(out) == " a city" and j.text == "Paris is a city"
