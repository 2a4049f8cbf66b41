"""Join tokens: ``mi1.`` + base64url(JSON {v, mesh, secret, addrs}).

The token carries the mesh secret: whoever holds it can join. It is meant
to be copied between the user's own machines, like an SSH key.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass

PREFIX = "mi1."
MAX_ADDRS = 16
MAX_TOKEN = 4096
_MESH_ID = re.compile(r"[0-9a-f]{16}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class InvalidJoinToken(ValueError):
    pass


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises InvalidJoinToken."""
    if not isinstance(addr, str) or len(addr) > 262:
        raise InvalidJoinToken(f"address {addr!r} is not host:port")
    host, sep, port_s = addr.rpartition(":")
    if (
        not sep
        or not host
        or not re.fullmatch(r"[0-9]{1,5}", port_s)
        or not 1 <= int(port_s) <= 65535
    ):
        raise InvalidJoinToken(f"address {addr!r} is not host:port with a port in 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidJoinToken(f"address {addr!r} has a bad IPv6 host") from None
        return host[1:-1], int(port_s)
    if not _HOSTNAME.fullmatch(host):
        raise InvalidJoinToken(f"address {addr!r} has a bad host name")
    return host, int(port_s)


@dataclass(frozen=True)
class JoinToken:
    mesh_id: str
    secret: bytes
    addrs: tuple[str, ...]

    def encode(self) -> str:
        body = json.dumps(
            {"v": 1, "mesh": self.mesh_id, "secret": self.secret.hex(), "addrs": list(self.addrs)},
            separators=(",", ":"),
        ).encode()
        return PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = "".join(text.split())
        if not text:
            raise InvalidJoinToken("the join token is empty")
        if len(text) > MAX_TOKEN:
            raise InvalidJoinToken("the join token is too long")
        if not text.startswith(PREFIX):
            raise InvalidJoinToken(
                f"not a mesh-inference join token (it should start with {PREFIX})"
            )
        b64 = text[len(PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        except (binascii.Error, ValueError):
            raise InvalidJoinToken("the join token is damaged (bad base64)") from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise InvalidJoinToken("the join token is damaged (bad JSON)") from None
        if not isinstance(data, dict):
            raise InvalidJoinToken("the join token is damaged (not an object)")
        if data.get("v") != 1:
            raise InvalidJoinToken(f"unsupported join token version {data.get('v')!r}")
        mesh = data.get("mesh")
        if not isinstance(mesh, str) or not _MESH_ID.fullmatch(mesh):
            raise InvalidJoinToken("the join token has a bad mesh id")
        secret_hex = data.get("secret")
        try:
            secret = bytes.fromhex(secret_hex) if isinstance(secret_hex, str) else b""
        except ValueError:
            secret = b""
        if len(secret) != 32:
            raise InvalidJoinToken("the join token's secret is not 32 bytes")
        addrs = data.get("addrs")
        if not isinstance(addrs, list) or not addrs:
            raise InvalidJoinToken("the join token lists no address to dial")
        if len(addrs) > MAX_ADDRS:
            raise InvalidJoinToken(f"the join token lists more than {MAX_ADDRS} addresses")
        for addr in addrs:
            parse_addr(addr)
        return cls(mesh, secret, tuple(addrs))
