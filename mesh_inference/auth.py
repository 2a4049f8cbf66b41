"""The mesh-secret handshake on a control stream, sans-I/O.

Flow (DESIGN.md "Handshake"): dialer Hello → acceptor Hello → dialer Proof
→ acceptor Proof + Welcome. The dialer proves first, so a stranger who
dials learns nothing from us. A Proof is an HMAC with the mesh secret and
an ECDSA signature with the node key, both over the transcript (both Hello
payloads) and the prover's role; the signature binds the node id, which is
the hash of the key.

Usage: ``hs = Handshake(identity, mesh, is_dialer=...)``; send
``hs.pop_frames()``; feed received frames to ``hs.handle_frame(frame)``
until ``hs.complete``. Any failure raises :class:`AuthFailed`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import struct

from .dcf import Frame, MessageType
from .identity import MeshCredentials, NodeIdentity, node_id_for, verify_signature

PROTOCOL = b"mesh-inference/1"
MAX_HANDSHAKE_PAYLOAD = 4096


class AuthFailed(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str, max_len: int) -> bytes:
    if not isinstance(value, str) or len(value) > max_len * 2:
        raise AuthFailed(f"bad {what}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AuthFailed(f"bad {what}") from None


def _json(payload: bytes) -> dict[str, object]:
    if len(payload) > MAX_HANDSHAKE_PAYLOAD:
        raise AuthFailed("handshake frame too large")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise AuthFailed("handshake frame is not JSON") from None
    if not isinstance(data, dict):
        raise AuthFailed("handshake frame is not an object")
    return data


class Handshake:
    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshCredentials,
        *,
        is_dialer: bool,
        nonce: bytes | None = None,
    ) -> None:
        self._identity = identity
        self._mesh = mesh
        self.is_dialer = is_dialer
        self._nonce = nonce if nonce is not None else secrets.token_bytes(32)
        self._out: list[tuple[MessageType, bytes]] = []
        self._my_hello = json.dumps(
            {
                "v": 1,
                "node_id": identity.node_id,
                "pubkey": _b64(identity.public_key_der()),
                "mesh_id": mesh.mesh_id,
                "nonce": _b64(self._nonce),
            },
            separators=(",", ":"),
        ).encode()
        self._peer_hello: bytes | None = None
        self.peer_id: str | None = None
        self.peer_pubkey_der: bytes | None = None
        self.complete = False
        self._failed = False
        # dialer: hello-sent → proof-sent → done; acceptor: wait-hello → proof-wait → done
        self._state = "wait-hello"
        if is_dialer:
            self._out.append((MessageType.HELLO, self._my_hello))

    def pop_frames(self) -> list[tuple[MessageType, bytes]]:
        out, self._out = self._out, []
        return out

    def _transcript(self) -> bytes:
        assert self._peer_hello is not None
        dialer, acceptor = (
            (self._my_hello, self._peer_hello)
            if self.is_dialer
            else (self._peer_hello, self._my_hello)
        )
        return (
            PROTOCOL
            + self._mesh.mesh_id.encode()
            + struct.pack(">I", len(dialer))
            + dialer
            + struct.pack(">I", len(acceptor))
            + acceptor
        )

    def _proof(self) -> bytes:
        role = b"dialer" if self.is_dialer else b"acceptor"
        data = self._transcript() + role
        mac = hmac.new(self._mesh.secret, data, hashlib.sha256).digest()
        return json.dumps(
            {"mac": _b64(mac), "sig": _b64(self._identity.sign(data))}, separators=(",", ":")
        ).encode()

    def _check_proof(self, payload: bytes) -> None:
        role = b"acceptor" if self.is_dialer else b"dialer"
        data = self._transcript() + role
        msg = _json(payload)
        mac = _unb64(msg.get("mac"), "mac", 64)
        sig = _unb64(msg.get("sig"), "signature", 128)
        want = hmac.new(self._mesh.secret, data, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, want):
            raise AuthFailed("auth failed: the peer does not know the mesh secret")
        assert self.peer_pubkey_der is not None
        if not verify_signature(self.peer_pubkey_der, sig, data):
            raise AuthFailed("auth failed: bad signature for the peer's node key")

    def _take_hello(self, payload: bytes) -> None:
        msg = _json(payload)
        if msg.get("v") != 1:
            raise AuthFailed(f"unsupported protocol version {msg.get('v')!r}")
        if msg.get("mesh_id") != self._mesh.mesh_id:
            raise AuthFailed("auth failed: the peer belongs to another mesh")
        pubkey = _unb64(msg.get("pubkey"), "public key", 256)
        nonce = _unb64(msg.get("nonce"), "nonce", 64)
        if len(nonce) != 32:
            raise AuthFailed("bad nonce")
        if msg.get("node_id") != node_id_for(pubkey):
            raise AuthFailed("auth failed: node id does not match the public key")
        if msg.get("node_id") == self._identity.node_id:
            raise AuthFailed("connected to ourselves")
        self._peer_hello = payload
        self.peer_pubkey_der = pubkey
        self.peer_id = node_id_for(pubkey)

    def handle_frame(self, frame: Frame) -> None:
        if self._failed or self.complete:
            raise AuthFailed(f"unexpected {frame.type.name} frame")
        try:
            self._step(frame)
        except AuthFailed:
            self._failed = True
            raise

    def _step(self, frame: Frame) -> None:
        t, state = frame.type, self._state
        if self.is_dialer:
            if state == "wait-hello" and t == MessageType.HELLO:
                self._take_hello(frame.payload)
                self._out.append((MessageType.PROOF, self._proof()))
                self._state = "wait-proof"
            elif state == "wait-proof" and t == MessageType.PROOF:
                self._check_proof(frame.payload)
                self._state = "wait-welcome"
            elif state == "wait-welcome" and t == MessageType.WELCOME:
                self.complete = True
            elif t == MessageType.ERROR:
                reason = _json(frame.payload).get("reason", "refused")
                raise AuthFailed(f"refused by peer: {str(reason)[:200]}")
            else:
                raise AuthFailed(f"unexpected {t.name} during handshake ({state})")
        else:
            if state == "wait-hello" and t == MessageType.HELLO:
                self._take_hello(frame.payload)
                self._out.append((MessageType.HELLO, self._my_hello))
                self._state = "wait-proof"
            elif state == "wait-proof" and t == MessageType.PROOF:
                self._check_proof(frame.payload)
                self._out.append((MessageType.PROOF, self._proof()))
                self._out.append((MessageType.WELCOME, b"{}"))
                self.complete = True
            else:
                raise AuthFailed(f"unexpected {t.name} during handshake ({state})")
