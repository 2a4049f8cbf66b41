"""Node identity (key pair, certificate, node id) and mesh credentials, in memory.

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
(core/handshake.py checks it). Every unreadable or inconsistent state file raises
:class:`IdentityError` naming the file and what to do; nothing is silently
overwritten except a *missing* certificate, which is derived data.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    pass

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


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_p256_public_key(public_key_der: bytes) -> ec.EllipticCurvePublicKey | None:
    """The P-256 key in ``public_key_der`` (SubjectPublicKeyInfo), or None."""
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # e.g. an unknown curve's OID
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
        return spki_der(self.private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))

    @classmethod
    def generate(cls) -> NodeIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, self_signed_certificate(key))


def self_signed_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    node_id = node_id_for(spki_der(key.public_key()))
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


def ca_issued_certificate_pem(identity: NodeIdentity) -> tuple[bytes, bytes]:
    """(certificate, key) in PEM: the node's key certified by a throwaway CA key.

    For TLS stacks that refuse a self-signed server certificate (qh3). The CA
    certificate itself is never needed: nobody checks the chain, peers
    authenticate the node key in the mesh handshake. A smaller server flight, too.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh-inference session CA")])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(identity.certificate.subject)
        .issuer_name(ca_name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mesh-inference")]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key = identity.private_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return leaf.public_bytes(pem), key


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


