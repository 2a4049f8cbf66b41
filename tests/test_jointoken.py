"""Join token encoding and validation."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_inference.core.jointoken import (
    InvalidJoinToken,
    JoinToken,
    format_addr,
    parse_addr,
)

MESH = "0123456789abcdef"
SECRET = bytes(range(32))


def _raw(obj: object) -> str:
    return "mi1." + base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


GOOD = {"v": 1, "mesh": MESH, "secret": SECRET.hex(), "addrs": ["127.0.0.1:1"]}


def test_round_trip_and_format() -> None:
    tok = JoinToken(MESH, SECRET, ("192.168.1.5:9337", "[::1]:9000", "host.lan:1"))
    text = tok.encode()
    assert text.startswith("mi1.")
    assert "=" not in text and "+" not in text and "/" not in text
    body = json.loads(base64.urlsafe_b64decode(text[4:] + "=" * (-len(text[4:]) % 4)))
    assert body == {
        "v": 1,
        "mesh": MESH,
        "secret": SECRET.hex(),
        "addrs": ["192.168.1.5:9337", "[::1]:9000", "host.lan:1"],
    }
    assert JoinToken.decode(text) == tok


def test_whitespace_is_tolerated() -> None:
    text = JoinToken(MESH, SECRET, ("10.0.0.1:9337",)).encode()
    wrapped = f"  {text[:20]}\n{text[20:40]}\r\n\t{text[40:]} \n"
    assert JoinToken.decode(wrapped).addrs == ("10.0.0.1:9337",)


def test_secret_is_not_in_repr() -> None:
    assert SECRET.hex() not in repr(JoinToken(MESH, SECRET, ("h:1",)))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("xyz", "should start with 'mi1.'"),
        ("mi2." + _raw(GOOD)[4:], "should start with"),
        ("mi1.%%%", "bad base64"),
        ("mi1.a=b", "bad base64"),
        ("mi1.A", "bad base64"),
        ("mi1.é", "bad base64"),
        ("mi1." + base64.urlsafe_b64encode(b"not json").decode(), "bad JSON"),
        ("mi1." + base64.urlsafe_b64encode(b"\xff\xfe").decode(), "bad JSON"),
        (_raw([1, 2]), "not an object"),
        (_raw({**GOOD, "v": 2}), "version 2"),
        (_raw({**GOOD, "v": True}), "version True"),
        (_raw({**GOOD, "v": "1"}), "version"),
        (_raw({"mesh": MESH}), "version None"),
        (_raw({**GOOD, "mesh": "XYZ"}), "mesh id"),
        (_raw({**GOOD, "mesh": MESH.upper()}), "mesh id"),
        (_raw({**GOOD, "mesh": 5}), "mesh id"),
        (_raw({**GOOD, "secret": "ab"}), "32 bytes"),
        (_raw({**GOOD, "secret": "zz" * 32}), "32 bytes"),
        (_raw({**GOOD, "secret": "ab" * 33}), "32 bytes"),
        (_raw({**GOOD, "secret": None}), "32 bytes"),
        (_raw({**GOOD, "addrs": []}), "no address"),
        (_raw({**GOOD, "addrs": "h:1"}), "no address"),
        (_raw({**GOOD, "addrs": ["h:1"] * 17}), "more than 16"),
        (_raw({**GOOD, "addrs": [5]}), "not host:port"),
        (_raw({**GOOD, "addrs": ["host"]}), "not host:port"),
        (_raw({**GOOD, "addrs": [":80"]}), "not host:port"),
        (_raw({**GOOD, "addrs": ["h:0"]}), "not host:port with a port in 1-65535"),
        (_raw({**GOOD, "addrs": ["h:65536"]}), "not host:port with a port in 1-65535"),
        (_raw({**GOOD, "addrs": ["h:-1"]}), "not host:port with a port in 1-65535"),
        (_raw({**GOOD, "addrs": ["h:http"]}), "not host:port with a port in 1-65535"),
        (_raw({**GOOD, "addrs": ["[zz]:1"]}), "bad IPv6"),
        (_raw({**GOOD, "addrs": ["[::1:1"]}), "unclosed"),
        (_raw({**GOOD, "addrs": ["::1:80"]}), "host name.*brackets"),
        (_raw({**GOOD, "addrs": ["bad host:1"]}), "bad host name"),
        (_raw({**GOOD, "addrs": ["a..b:1"]}), "bad host name"),
        (_raw({**GOOD, "addrs": ["-a.b:1"]}), "bad host name"),
        (_raw({**GOOD, "addrs": ["999.1.1.1:1"]}), "bad IPv4"),
        (_raw({**GOOD, "addrs": ["x" * 300 + ":1"]}), "not host:port"),
        ("mi1." + "A" * 9000, "too long"),
    ],
)
def test_bad_tokens_are_explained(text: str, match: str) -> None:
    with pytest.raises(InvalidJoinToken, match=match):
        JoinToken.decode(text)


def test_invalid_join_token_is_a_value_error() -> None:
    assert issubclass(InvalidJoinToken, ValueError)


@pytest.mark.parametrize(
    ("addr", "want"),
    [
        ("127.0.0.1:9337", ("127.0.0.1", 9337)),
        ("[::1]:1", ("::1", 1)),
        ("[fe80::1]:65535", ("fe80::1", 65535)),
        ("node-a.local:4433", ("node-a.local", 4433)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_addr(addr: str, want: tuple[str, int]) -> None:
    assert parse_addr(addr) == want
    assert format_addr(*want) == addr


@given(st.text(max_size=300))
def test_decode_never_crashes(text: str) -> None:
    with contextlib.suppress(InvalidJoinToken):
        JoinToken.decode(text)


@given(st.binary(max_size=400))
def test_decode_of_random_payloads_never_crashes(raw: bytes) -> None:
    with contextlib.suppress(InvalidJoinToken):
        JoinToken.decode("mi1." + base64.urlsafe_b64encode(raw).decode().rstrip("="))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["10.1.2.3", "[::1]", "a.b-c.example", "h"]),
            st.integers(1, 65535),
        ),
        min_size=1,
        max_size=16,
    ),
    st.binary(min_size=32, max_size=32),
)
def test_round_trip_property(addrs: list[tuple[str, int]], secret: bytes) -> None:
    tok = JoinToken(MESH, secret, tuple(f"{h}:{p}" for h, p in addrs))
    assert JoinToken.decode(tok.encode()) == tok
