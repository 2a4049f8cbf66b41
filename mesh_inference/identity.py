"""Node identity (key pair, certificate, node id) and mesh credentials on disk.

Public API::

    ident = load_or_create_identity(state_dir)      # node.key (0600 PEM) + node.crt
    ident.node_id; ident.public_key_der(); ident.sign(data); ident.certificate
    NodeIdentity.generate()                         # in memory only (tests, devmesh)
    node_id_for(pubkey_der) -> str                  # 16 lowercase hex chars
    verify_signature(pubkey_der, sig, data) -> bool # ECDSA P-256 / SHA-256
    mesh = load_or_create_mesh(state_dir, token, replace=False)  # mesh.json (0600)
    MeshCredentials(mesh_id, secret); MeshCredentials.generate()

The node id is the first 8 bytes of SHA-256 over the public key's
SubjectPublicKeyInfo DER, so nobody can claim an id without holding the key
(auth.py checks it). Every unreadable or inconsistent state file raises
:class:`IdentityError` naming the file and what to do; nothing is silently
overwritten except a *missing* certificate, which is derived data.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from .jointoken import JoinToken

KEY_FILE = "node.key"
CERT_FILE = "node.crt"
MESH_FILE = "mesh.json"
CERT_VALIDITY = datetime.timedelta(days=3650)
MESH_ID_RE = re.compile(r"[0-9a-f]{16}")
SECRET_BYTES = 32
# State files are a few hundred bytes; refusing big ones keeps a wrong path cheap.
MAX_STATE_FILE = 64 << 10


class IdentityError(ValueError):
    """A state file is unreadable or inconsistent."""


def node_id_for(public_key_der: bytes) -> str:
    return hashlib.sha256(public_key_der).digest()[:8].hex()


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_p256_public_key(public_key_der: bytes) -> ec.EllipticCurvePublicKey | None:
    """The P-256 key in ``public_key_der`` (SubjectPublicKeyInfo), or None."""
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key


def verify_signature(public_key_der: bytes, signature: bytes, data: bytes) -> bool:
    key = load_p256_public_key(public_key_der)
    if key is None:
        return False
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class NodeIdentity:
    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    node_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_id", node_id_for(self.public_key_der()))

    def public_key_der(self) -> bytes:
        return _spki(self.private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))

    @classmethod
    def generate(cls) -> NodeIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, _self_signed(key))


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    node_id = node_id_for(_spki(key.public_key()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mesh-inference-{node_id}")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # A day of slack: peers' clocks may be behind ours.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CERT_VALIDITY)
        .sign(key, hashes.SHA256())
    )


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file so a crash never leaves a half-written state file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # O_CREAT would keep an old file's looser mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _read_state_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_STATE_FILE:
            raise IdentityError(f"{path} is too large to be a mesh-inference state file")
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None


def _prepare_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create state dir {state_dir}: {exc.strerror or exc}") from None
    if not state_dir.is_dir():
        raise IdentityError(f"state dir {state_dir} is not a directory")


def load_or_create_identity(state_dir: Path) -> NodeIdentity:
    """The node's identity from ``state_dir``; a new one if there is no key yet."""
    _prepare_dir(state_dir)
    key_path, crt_path = state_dir / KEY_FILE, state_dir / CERT_FILE
    if not key_path.exists():
        ident = NodeIdentity.generate()
        _write_atomic(
            key_path,
            ident.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        _write_atomic(crt_path, ident.certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        return ident

    raw = _read_state_file(key_path)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"{key_path} is not a readable unencrypted PEM private key ({exc}); "
            "restore it from a backup, or delete it to give this node a new identity"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise IdentityError(f"{key_path} is not a P-256 (secp256r1) key")

    if not crt_path.exists():
        # The certificate is derived from the key: re-issuing it changes nothing a peer checks.
        cert = _self_signed(key)
        _write_atomic(crt_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return NodeIdentity(key, cert)
    try:
        cert = x509.load_pem_x509_certificate(_read_state_file(crt_path))
    except ValueError as exc:
        raise IdentityError(
            f"{crt_path} is not a readable PEM certificate ({exc}); "
            "delete it and it will be re-issued from node.key"
        ) from None
    cert_key = cert.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or _spki(cert_key) != _spki(
        key.public_key()
    ):
        raise IdentityError(
            f"{crt_path} does not belong to {key_path} (another node's files mixed in?); "
            "delete node.crt and it will be re-issued from node.key"
        )
    return NodeIdentity(key, cert)


@dataclass(frozen=True)
class MeshCredentials:
    mesh_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not MESH_ID_RE.fullmatch(self.mesh_id):
            raise ValueError("a mesh id is 16 lowercase hex characters")
        if len(self.secret) != SECRET_BYTES:
            raise ValueError(f"a mesh secret is {SECRET_BYTES} bytes")

    @classmethod
    def generate(cls) -> MeshCredentials:
        return cls(secrets.token_hex(8), secrets.token_bytes(SECRET_BYTES))


def _load_mesh(path: Path) -> MeshCredentials:
    raw = _read_state_file(path)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        mesh_id, secret_hex = data.get("mesh_id"), data.get("secret")
        if not isinstance(mesh_id, str) or not isinstance(secret_hex, str):
            raise ValueError("mesh_id and secret must be strings")
        return MeshCredentials(mesh_id, bytes.fromhex(secret_hex))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IdentityError(
            f"{path} is corrupt ({exc}); restore it, or delete it and join the mesh "
            "again with a join token"
        ) from None


def load_or_create_mesh(
    state_dir: Path, token: JoinToken | None, *, replace: bool = True
) -> MeshCredentials:
    """The mesh this node belongs to: from the token when joining, else stored, else new.

    Joining with a token for another mesh replaces the stored credentials:
    the user asked to join that mesh. ``replace=False`` refuses instead
    (raises :class:`IdentityError`).
    """
    _prepare_dir(state_dir)
    path = state_dir / MESH_FILE
    stored = _load_mesh(path) if path.exists() else None
    if token is None:
        if stored is not None:
            return stored
        creds = MeshCredentials.generate()
    else:
        creds = MeshCredentials(token.mesh_id, token.secret)
        if stored == creds:
            return stored
        if stored is not None and not replace:
            what = "another secret for mesh" if stored.mesh_id == creds.mesh_id else "mesh"
            raise IdentityError(
                f"{state_dir} belongs to mesh {stored.mesh_id}, but the join token is for "
                f"{what} {creds.mesh_id}"
            )
    body = json.dumps({"mesh_id": creds.mesh_id, "secret": creds.secret.hex()}).encode()
    _write_atomic(path, body, 0o600)
    return creds
