"""Join tokens: ``mi1.`` + base64url-no-padding(JSON {"v":1,"mesh","secret","addrs"}).

Public API::

    JoinToken(mesh_id, secret, addrs).encode() -> str
    JoinToken.decode(text) -> JoinToken      # raises InvalidJoinToken(ValueError)
    parse_addr("host:port" | "[v6]:port") -> (host, port)   # raises InvalidJoinToken
    format_addr(host, port) -> str

The token carries the mesh secret: whoever holds it can join. It is meant
to be copied between the user's own machines, like an SSH key. Decoding
tolerates whitespace (line-wrapped copies) and explains every rejection.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass, field

PREFIX = "mi1."
VERSION = 1
MAX_ADDRS = 16
MAX_ADDR_LEN = 262  # a 253-char host name, ":", a port; IPv6 literals are shorter
# 16 maximal addresses in JSON, base64-inflated, with room to spare.
MAX_TOKEN = 8192
_MESH_ID = re.compile(r"[0-9a-f]{16}")
_SECRET_HEX = re.compile(r"[0-9a-fA-F]{64}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class InvalidJoinToken(ValueError):
    pass


def parse_addr(addr: object) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port) with a port in 1-65535."""
    if not isinstance(addr, str) or not addr or len(addr) > MAX_ADDR_LEN:
        raise InvalidJoinToken(f"address {addr!r} is not host:port")
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host:
        raise InvalidJoinToken(f"address {addr!r} is not host:port")
    if not re.fullmatch(r"[0-9]{1,5}", port_s) or not 1 <= int(port_s) <= 65535:
        raise InvalidJoinToken(f"address {addr!r} is not host:port with a port in 1-65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise InvalidJoinToken(f"address {addr!r} has an unclosed [")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidJoinToken(f"address {addr!r} has a bad IPv6 host") from None
        return host[1:-1], int(port_s)
    if ":" in host:
        raise InvalidJoinToken(
            f"address {addr!r} has a bad host name (write IPv6 hosts in brackets: [::1]:port)"
        )
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise InvalidJoinToken(f"address {addr!r} has a bad host name")
    labels = host.split(".")
    if len(labels) == 4 and all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise InvalidJoinToken(f"address {addr!r} has a bad IPv4 host") from None
    return host, int(port_s)


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class JoinToken:
    mesh_id: str
    secret: bytes = field(repr=False)
    addrs: tuple[str, ...]

    def encode(self) -> str:
        body = json.dumps(
            {
                "v": VERSION,
                "mesh": self.mesh_id,
                "secret": self.secret.hex(),
                "addrs": list(self.addrs),
            },
            separators=(",", ":"),
        ).encode()
        return PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        if not isinstance(text, str):
            raise InvalidJoinToken("the join token must be text")
        text = "".join(text.split())
        if not text:
            raise InvalidJoinToken("the join token is empty")
        if len(text) > MAX_TOKEN:
            raise InvalidJoinToken(f"the join token is too long (over {MAX_TOKEN} characters)")
        if not text.startswith(PREFIX):
            raise InvalidJoinToken(
                f"not a mesh-inference join token (it should start with {PREFIX!r})"
            )
        b64 = text[len(PREFIX) :].rstrip("=")  # padding is not written, but harmless
        # urlsafe_b64decode silently skips foreign characters; check the alphabet first.
        if not _B64URL.fullmatch(b64) or len(b64) % 4 == 1:
            raise InvalidJoinToken("the join token is damaged (bad base64)")
        try:
            raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        except (binascii.Error, ValueError):
            raise InvalidJoinToken("the join token is damaged (bad base64)") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InvalidJoinToken("the join token is damaged (bad JSON)") from None
        if not isinstance(data, dict):
            raise InvalidJoinToken("the join token is damaged (JSON, but not an object)")
        version = data.get("v")
        # bool is an int subclass: {"v": true} must not pass for version 1.
        if type(version) is not int or version != VERSION:
            raise InvalidJoinToken(
                f"unsupported join token version {version!r} (this program reads {VERSION})"
            )
        mesh = data.get("mesh")
        if not isinstance(mesh, str) or not _MESH_ID.fullmatch(mesh):
            raise InvalidJoinToken("the join token has a bad mesh id (16 lowercase hex chars)")
        secret_hex = data.get("secret")
        if not isinstance(secret_hex, str) or not _SECRET_HEX.fullmatch(secret_hex):
            raise InvalidJoinToken("the join token's secret is not 32 bytes of hex")
        secret = bytes.fromhex(secret_hex)
        addrs = data.get("addrs")
        if not isinstance(addrs, list) or not addrs:
            raise InvalidJoinToken("the join token lists no address to dial")
        if len(addrs) > MAX_ADDRS:
            raise InvalidJoinToken(f"the join token lists more than {MAX_ADDRS} addresses")
        for addr in addrs:
            parse_addr(addr)
        return cls(mesh, secret, tuple(addrs))
