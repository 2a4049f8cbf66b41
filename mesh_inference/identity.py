"""Node identity (key pair, certificate, node id) and mesh credentials on disk.

- ``node.key`` (PEM, 0600) and ``node.crt``: a P-256 key and a self-signed
  certificate used for QUIC/TLS 1.3. The node id is derived from the public
  key, so it cannot be claimed without the private key (auth.py checks it).
- ``mesh.json`` (0600): the mesh id and the 32-byte mesh secret that every
  peer must prove in the handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from .jointoken import JoinToken


class IdentityError(ValueError):
    """A state file is unreadable or inconsistent."""


def node_id_for(public_key_der: bytes) -> str:
    return hashlib.sha256(public_key_der).digest()[:8].hex()


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_signature(public_key_der: bytes, signature: bytes, data: bytes) -> bool:
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError):
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
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
    node_id: str

    def public_key_der(self) -> bytes:
        return _spki(self.private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))

    @classmethod
    def generate(cls) -> NodeIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        node_id = node_id_for(_spki(key.public_key()))
        return cls(key, _self_signed(key, node_id), node_id)


def _self_signed(key: ec.EllipticCurvePrivateKey, node_id: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mesh-inference-{node_id}")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def load_or_create_identity(state_dir: Path) -> NodeIdentity:
    state_dir.mkdir(parents=True, exist_ok=True)
    key_path, crt_path = state_dir / "node.key", state_dir / "node.crt"
    if not key_path.exists():
        ident = NodeIdentity.generate()
        _write_private(
            key_path,
            ident.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        crt_path.write_bytes(ident.certificate.public_bytes(serialization.Encoding.PEM))
        return ident
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise IdentityError(f"{key_path} is not a readable private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{key_path} is not a P-256 key")
    node_id = node_id_for(_spki(key.public_key()))
    try:
        cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
        if _spki(cert.public_key()) != _spki(key.public_key()):  # type: ignore[arg-type]
            raise ValueError("certificate does not match the key")
    except (ValueError, OSError):
        # The certificate is derived data: re-issue it rather than refuse to start.
        cert = _self_signed(key, node_id)
        crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return NodeIdentity(key, cert, node_id)


@dataclass(frozen=True)
class MeshCredentials:
    mesh_id: str
    secret: bytes

    @classmethod
    def generate(cls) -> MeshCredentials:
        return cls(secrets.token_hex(8), secrets.token_bytes(32))


def load_or_create_mesh(
    state_dir: Path, token: JoinToken | None, *, replace: bool = True
) -> MeshCredentials:
    """The mesh this node belongs to: from the token when joining, else stored, else new.

    Joining with a token for another mesh replaces the stored credentials
    (``replace=False`` refuses instead): the user asked to join that mesh.
    """
    path = state_dir / "mesh.json"
    stored: MeshCredentials | None = None
    if path.exists():
        try:
            data = json.loads(path.read_text())
            stored = MeshCredentials(str(data["mesh_id"]), bytes.fromhex(data["secret"]))
            if len(stored.secret) != 32 or len(stored.mesh_id) != 16:
                raise ValueError("bad sizes")
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise IdentityError(
                f"{path} is corrupt ({exc}); delete it to start a new mesh"
            ) from None
    if token is not None:
        creds = MeshCredentials(token.mesh_id, token.secret)
        if stored is not None and stored != creds and not replace:
            raise IdentityError(
                f"{state_dir} belongs to mesh {stored.mesh_id}, the token is for {creds.mesh_id}"
            )
    elif stored is not None:
        return stored
    else:
        creds = MeshCredentials.generate()
    if creds != stored:
        _write_private(
            path, json.dumps({"mesh_id": creds.mesh_id, "secret": creds.secret.hex()}).encode()
        )
    return creds
