"""Node identity and mesh credentials on disk."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_inference.core.identity import (
    IdentityError,
    MeshCredentials,
    NodeIdentity,
    node_id_for,
    verify_signature,
)
from mesh_inference.core.jointoken import JoinToken
from mesh_inference.machine.state import load_or_create_identity, load_or_create_mesh


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_identity_is_created_once_and_persists(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "state")
    b = load_or_create_identity(tmp_path / "state")
    assert a.node_id == b.node_id
    assert a.public_key_der() == b.public_key_der()
    assert _mode(tmp_path / "state" / "node.key") == 0o600
    assert (tmp_path / "state" / "node.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE")


def test_node_id_is_the_hash_of_the_spki() -> None:
    ident = NodeIdentity.generate()
    spki = ident.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ident.public_key_der() == spki
    assert ident.node_id == hashlib.sha256(spki).digest()[:8].hex() == node_id_for(spki)
    assert len(ident.node_id) == 16 and ident.node_id == ident.node_id.lower()


def test_certificate_is_self_signed_for_the_node_key_for_years() -> None:
    ident = NodeIdentity.generate()
    cert = ident.certificate
    assert cert.issuer == cert.subject
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == ident.public_key_der()
    )
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert validity.days >= 9 * 365


def test_signatures_verify_only_for_the_right_key_and_data() -> None:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    sig = a.sign(b"data")
    assert verify_signature(a.public_key_der(), sig, b"data")
    assert not verify_signature(a.public_key_der(), sig, b"other")
    assert not verify_signature(b.public_key_der(), sig, b"data")
    assert not verify_signature(a.public_key_der(), b"\x00" * 70, b"data")
    assert not verify_signature(b"garbage", sig, b"data")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert not verify_signature(p384, sig, b"data")


def test_corrupt_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_text("not a key")
    with pytest.raises(IdentityError, match=r"node\.key.*not a readable"):
        load_or_create_identity(tmp_path)


def test_key_of_another_curve_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "node.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match="P-256"):
        load_or_create_identity(tmp_path)


def test_missing_certificate_is_reissued_from_the_key(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    (tmp_path / "node.crt").unlink()
    again = load_or_create_identity(tmp_path)
    assert again.node_id == first.node_id
    assert (tmp_path / "node.crt").exists()


def test_corrupt_or_foreign_certificate_is_a_clear_error(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    (tmp_path / "node.crt").write_text("garbage")
    with pytest.raises(IdentityError, match=r"node\.crt"):
        load_or_create_identity(tmp_path)
    other = NodeIdentity.generate()
    (tmp_path / "node.crt").write_bytes(
        other.certificate.public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(IdentityError, match="does not belong"):
        load_or_create_identity(tmp_path)


def test_state_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(IdentityError, match="state dir"):
        load_or_create_identity(tmp_path / "f")


def test_mesh_is_created_once_and_stored_privately(tmp_path: Path) -> None:
    first = load_or_create_mesh(tmp_path, None)
    assert load_or_create_mesh(tmp_path, None) == first
    assert _mode(tmp_path / "mesh.json") == 0o600
    assert len(first.mesh_id) == 16 and len(first.secret) == 32
    assert first.secret.hex() not in repr(first)


def test_joining_takes_the_token_credentials(tmp_path: Path) -> None:
    creds = MeshCredentials.generate()
    token = JoinToken(creds.mesh_id, creds.secret, ("127.0.0.1:9337",))
    assert load_or_create_mesh(tmp_path, token) == creds
    assert load_or_create_mesh(tmp_path, None) == creds  # remembered for restarts
    assert load_or_create_mesh(tmp_path, token) == creds  # same token again: fine


def test_token_for_another_mesh_replaces_unless_refused(tmp_path: Path) -> None:
    mine = load_or_create_mesh(tmp_path, None)
    other = MeshCredentials.generate()
    token = JoinToken(other.mesh_id, other.secret, ("127.0.0.1:9337",))
    with pytest.raises(IdentityError, match=f"belongs to mesh {mine.mesh_id}"):
        load_or_create_mesh(tmp_path, token, replace=False)
    assert load_or_create_mesh(tmp_path, None) == mine  # untouched
    assert load_or_create_mesh(tmp_path, token) == other
    assert load_or_create_mesh(tmp_path, None) == other


def test_token_with_another_secret_for_the_same_mesh_is_refused(tmp_path: Path) -> None:
    mine = load_or_create_mesh(tmp_path, None)
    token = JoinToken(mine.mesh_id, os.urandom(32), ("127.0.0.1:9337",))
    with pytest.raises(IdentityError, match="another secret"):
        load_or_create_mesh(tmp_path, token, replace=False)


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "[]",
        json.dumps({"mesh_id": "0123456789abcdef"}),
        json.dumps({"mesh_id": "0123456789abcdef", "secret": "ab"}),
        json.dumps({"mesh_id": "XYZ", "secret": "ab" * 32}),
        json.dumps({"mesh_id": "0123456789abcdef", "secret": "zz" * 32}),
    ],
)
def test_corrupt_mesh_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "mesh.json").write_text(content)
    with pytest.raises(IdentityError, match=r"mesh\.json is corrupt"):
        load_or_create_mesh(tmp_path, None)


def test_mesh_credentials_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="mesh id"):
        MeshCredentials("short", os.urandom(32))
    with pytest.raises(ValueError, match="32 bytes"):
        MeshCredentials("0123456789abcdef", b"x")
