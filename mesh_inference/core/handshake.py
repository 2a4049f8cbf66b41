"""The mesh-secret handshake on the control stream, sans-I/O.

Public API::

    hs = Handshake(identity, mesh, is_dialer=True, channel_binding=binding)
    for mtype, payload in hs.pop_frames(): ...   # send as DCF frames, in order
    hs.handle_frame(frame)                       # each received control frame
    hs.peer_proved                               # the peer's Proof checked out
    hs.complete; hs.peer_id; hs.peer_pubkey_der  # once complete
    AuthFailed(reason)                           # raised on any failure; then drop the peer

Flow (DESIGN.md "Handshake"): dialer Hello → acceptor Hello → dialer Proof
→ acceptor Proof + Welcome. A Proof is an HMAC-SHA256 with the mesh secret
and an ECDSA-P256-SHA256 signature with the node key, both over the
transcript ``"mesh-inference/1" ‖ mesh_id ‖ u32 len ‖ channel binding ‖
u32 len ‖ dialer Hello ‖ u32 len ‖ acceptor Hello`` (each Hello with a
fresh 32-byte nonce) followed by the prover's role (``dialer`` or
``acceptor``), so a proof can be neither replayed into another
session nor reflected back to its sender. The signature binds the node id,
which is the hash of the key.

The transcript also carries ``channel_binding``: a secret both ends derive
from *this* TLS session (``PeerSession`` uses the TLS 1.3 key schedule over
the whole TLS transcript, see session.py). It is equal on both ends of one
TLS session and differs between any two, so a relay that terminates TLS
with each side separately and forwards the control frames gets proofs
bound to the wrong session: both sides refuse them. No TLS certificate
needs checking: the node key is proven by the signature, the session by
the binding.

The dialer proves first, so a stranger who dials learns nothing, and it
checks the acceptor's Hello (version, mesh id, node id = hash of the key)
before it proves anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import struct
from enum import Enum

from mesh_inference.core.dcf import Frame, MessageType
from mesh_inference.core.identity import (
    MeshCredentials,
    NodeIdentity,
    load_p256_public_key,
    node_id_for,
    verify_signature,
)

PROTOCOL = b"mesh-inference/1"
VERSION = 1
NONCE_BYTES = 32
MIN_CHANNEL_BINDING = 16  # a binding this short could be guessed
MAX_CHANNEL_BINDING = 64
# Hellos and Proofs are a few hundred bytes; anything much bigger is hostile.
MAX_HANDSHAKE_PAYLOAD = 4096
MAX_PUBKEY_DER = 512
MAX_SIGNATURE = 160  # a DER ECDSA P-256 signature is at most 72 bytes


class AuthFailed(Exception):
    """The peer could not be authenticated; ``reason`` says why (safe to log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _State(Enum):
    WAIT_HELLO = "wait-hello"
    WAIT_PROOF = "wait-proof"
    WAIT_WELCOME = "wait-welcome"
    DONE = "done"
    FAILED = "failed"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str, max_len: int) -> bytes:
    if not isinstance(value, str) or len(value) > (max_len + 2) * 4 // 3 + 4:
        raise AuthFailed(f"bad {what} in handshake")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AuthFailed(f"bad {what} in handshake (not base64)") from None
    if len(raw) > max_len:
        raise AuthFailed(f"bad {what} in handshake (too long)")
    return raw


def _json(payload: bytes, what: str) -> dict[str, object]:
    if len(payload) > MAX_HANDSHAKE_PAYLOAD:
        raise AuthFailed(f"{what} frame is too large ({len(payload)} B)")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # "[[[[…" nests past the stack
        raise AuthFailed(f"{what} frame is not JSON") from None
    if not isinstance(data, dict):
        raise AuthFailed(f"{what} frame is not a JSON object")
    return data


class Handshake:
    """One side of the handshake. Feed frames in, send what :meth:`pop_frames` returns."""

    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshCredentials,
        *,
        is_dialer: bool,
        channel_binding: bytes,
        nonce: bytes | None = None,
    ) -> None:
        if nonce is not None and len(nonce) != NONCE_BYTES:
            raise ValueError(f"a handshake nonce is {NONCE_BYTES} bytes")
        if not MIN_CHANNEL_BINDING <= len(channel_binding) <= MAX_CHANNEL_BINDING:
            raise ValueError(
                f"a channel binding is {MIN_CHANNEL_BINDING}-{MAX_CHANNEL_BINDING} bytes"
            )
        self._identity = identity
        self._mesh = mesh
        self.is_dialer = is_dialer
        self._binding = channel_binding
        self._out: list[tuple[MessageType, bytes]] = []
        self._my_hello = json.dumps(
            {
                "v": VERSION,
                "node_id": identity.node_id,
                "pubkey": _b64(identity.public_key_der()),
                "mesh_id": mesh.mesh_id,
                "nonce": _b64(nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES)),
            },
            separators=(",", ":"),
        ).encode()
        self._peer_hello: bytes | None = None
        self.peer_id: str | None = None
        self.peer_pubkey_der: bytes | None = None
        self._state = _State.WAIT_HELLO
        if is_dialer:
            self._out.append((MessageType.HELLO, self._my_hello))

    @property
    def complete(self) -> bool:
        return self._state is _State.DONE

    @property
    def peer_proved(self) -> bool:
        """The peer's Proof checked out (the dialer then only waits for Welcome)."""
        return self._state in (_State.WAIT_WELCOME, _State.DONE)

    @property
    def failed(self) -> bool:
        return self._state is _State.FAILED

    def pop_frames(self) -> list[tuple[MessageType, bytes]]:
        """Frames to send now, in order: (type, payload)."""
        out, self._out = self._out, []
        return out

    def handle_frame(self, frame: Frame) -> None:
        if self._state in (_State.DONE, _State.FAILED):
            raise AuthFailed(f"unexpected {frame.type.name} frame after the handshake ended")
        try:
            self._step(frame)
        except AuthFailed:
            self._state = _State.FAILED
            self._out.clear()
            raise

    # -- internals
    def _transcript(self, role: bytes) -> bytes:
        assert self._peer_hello is not None
        dialer, acceptor = (
            (self._my_hello, self._peer_hello)
            if self.is_dialer
            else (self._peer_hello, self._my_hello)
        )
        return b"".join(
            (
                PROTOCOL,
                self._mesh.mesh_id.encode(),
                struct.pack(">I", len(self._binding)),
                self._binding,
                struct.pack(">I", len(dialer)),
                dialer,
                struct.pack(">I", len(acceptor)),
                acceptor,
                role,
            )
        )

    def _my_role(self) -> bytes:
        return b"dialer" if self.is_dialer else b"acceptor"

    def _peer_role(self) -> bytes:
        return b"acceptor" if self.is_dialer else b"dialer"

    def _proof(self) -> bytes:
        data = self._transcript(self._my_role())
        mac = hmac.new(self._mesh.secret, data, hashlib.sha256).digest()
        return json.dumps(
            {"mac": _b64(mac), "sig": _b64(self._identity.sign(data))}, separators=(",", ":")
        ).encode()

    def _check_proof(self, payload: bytes) -> None:
        msg = _json(payload, "Proof")
        mac = _unb64(msg.get("mac"), "mac", 32)
        sig = _unb64(msg.get("sig"), "signature", MAX_SIGNATURE)
        data = self._transcript(self._peer_role())
        want = hmac.new(self._mesh.secret, data, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, want):
            # Also what a relay sees: its two TLS sessions have different bindings.
            raise AuthFailed(
                "auth failed: the peer does not know the mesh secret (or the session is relayed)"
            )
        assert self.peer_pubkey_der is not None
        if not verify_signature(self.peer_pubkey_der, sig, data):
            raise AuthFailed("auth failed: bad signature for the peer's node key")

    def _take_hello(self, payload: bytes) -> None:
        msg = _json(payload, "Hello")
        version = msg.get("v")
        if type(version) is not int or version != VERSION:
            raise AuthFailed(f"unsupported protocol version {version!r}")
        if msg.get("mesh_id") != self._mesh.mesh_id:
            raise AuthFailed("auth failed: the peer belongs to another mesh")
        pubkey = _unb64(msg.get("pubkey"), "public key", MAX_PUBKEY_DER)
        if load_p256_public_key(pubkey) is None:
            raise AuthFailed("auth failed: the peer's public key is not a P-256 key")
        nonce = _unb64(msg.get("nonce"), "nonce", NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise AuthFailed(f"bad nonce in handshake (not {NONCE_BYTES} bytes)")
        node_id = node_id_for(pubkey)
        if msg.get("node_id") != node_id:
            raise AuthFailed("auth failed: node id does not match the public key")
        if node_id == self._identity.node_id:
            raise AuthFailed("connected to ourselves")
        self._peer_hello = payload
        self.peer_pubkey_der = pubkey
        self.peer_id = node_id

    def _step(self, frame: Frame) -> None:
        t, state = frame.type, self._state
        if t == MessageType.ERROR:
            try:
                reason = str(_json(frame.payload, "Error").get("reason", "no reason given"))
            except AuthFailed:
                reason = "no reason given"
            raise AuthFailed(f"refused by peer: {reason[:200]}")
        if self.is_dialer:
            if state is _State.WAIT_HELLO and t == MessageType.HELLO:
                self._take_hello(frame.payload)
                self._out.append((MessageType.PROOF, self._proof()))
                self._state = _State.WAIT_PROOF
            elif state is _State.WAIT_PROOF and t == MessageType.PROOF:
                self._check_proof(frame.payload)
                self._state = _State.WAIT_WELCOME
            elif state is _State.WAIT_WELCOME and t == MessageType.WELCOME:
                _json(frame.payload, "Welcome")  # {} today; later versions may add fields
                self._state = _State.DONE
            else:
                raise AuthFailed(f"unexpected {t.name} during handshake ({state.value})")
        elif state is _State.WAIT_HELLO and t == MessageType.HELLO:
            self._take_hello(frame.payload)
            self._out.append((MessageType.HELLO, self._my_hello))
            self._state = _State.WAIT_PROOF
        elif state is _State.WAIT_PROOF and t == MessageType.PROOF:
            self._check_proof(frame.payload)
            self._out.append((MessageType.PROOF, self._proof()))
            self._out.append((MessageType.WELCOME, b"{}"))
            self._state = _State.DONE
        else:
            raise AuthFailed(f"unexpected {t.name} during handshake ({state.value})")
