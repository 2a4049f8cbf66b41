"""This node's state files: identity key and certificate, mesh credentials, secrets.

Public API::

    ident = load_or_create_identity(state_dir)      # node.key (0600 PEM) + node.crt
    mesh = load_or_create_mesh(state_dir, token)    # mesh.json (0600)
    token = load_or_create_console_token(state_dir) # console-token (0600)
    read_console_token(state_dir)                   # the same, or None: never creates
    next_boot(state_dir) -> int                     # boots: 1, 2, 3 … (counted in "boots")
    write_private_file(path, data)                  # 0600 from creation, atomic

Every file holding a secret is created with mode 0600 by ``open`` itself,
never chmod-ed after the bytes are on disk (another user could open it in
between). Every unreadable or inconsistent state file raises
:class:`IdentityError` naming the file and what to do.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh_inference.core.identity import (
    CERT_FILE,
    KEY_FILE,
    MAX_STATE_FILE,
    MESH_FILE,
    IdentityError,
    MeshCredentials,
    NodeIdentity,
    self_signed_certificate,
    spki_der,
)

if TYPE_CHECKING:
    from mesh_inference.core.jointoken import JoinToken


CONSOLE_TOKEN_FILE = "console-token"
BOOTS_FILE = "boots"
# What a console token looks like (secrets.token_urlsafe): safe in a URL and in a cookie.
CONSOLE_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32,512}")


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write a secret: mode 0600 from the moment the file exists."""
    _write_atomic(path, data, 0o600)


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
        cert = self_signed_certificate(key)
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
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or spki_der(cert_key) != spki_der(
        key.public_key()
    ):
        raise IdentityError(
            f"{crt_path} does not belong to {key_path} (another node's files mixed in?); "
            "delete node.crt and it will be re-issued from node.key"
        )
    return NodeIdentity(key, cert)


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


def load_or_create_console_token(state_dir: Path) -> str:
    """The console login token, from ``<state-dir>/console-token``; a new one if absent.

    32 random bytes, URL-safe base64. It is kept across restarts so a console
    tab stays logged in; delete the file to log every browser out.
    """
    _prepare_dir(state_dir)
    path = state_dir / CONSOLE_TOKEN_FILE
    if not path.exists():
        token = secrets.token_urlsafe(32)
        write_private_file(path, (token + "\n").encode())
        return token
    token = _read_state_file(path).decode("ascii", errors="replace").strip()
    if not CONSOLE_TOKEN_RE.fullmatch(token):
        raise IdentityError(
            f"{path} does not hold a console token (32-512 characters of A-Z a-z 0-9 _ -); "
            "delete it and a new one is created"
        )
    return token


def read_console_token(state_dir: Path) -> str | None:
    """The console token if ``<state-dir>/console-token`` holds one (for clients of a node)."""
    try:
        token = _read_state_file(state_dir / CONSOLE_TOKEN_FILE)
    except IdentityError:
        return None
    text = token.decode("ascii", errors="replace").strip()
    return text if CONSOLE_TOKEN_RE.fullmatch(text) else None


def next_boot(state_dir: Path) -> int:
    """Count this start in ``<state-dir>/boots`` and return its number (1 for the first).

    A restarted node announces a membership incarnation above its earlier
    lives' (``core.membership.first_incarnation``), so peers take its new
    record over what they remember of the old one. An unreadable count starts
    over at 1 rather than keep the node from starting.
    """
    _prepare_dir(state_dir)
    path = state_dir / BOOTS_FILE
    try:
        previous = int(_read_state_file(path).decode("ascii").strip()) if path.exists() else 0
    except (IdentityError, ValueError, UnicodeDecodeError):
        previous = 0
    boot = max(previous, 0) + 1
    _write_atomic(path, f"{boot}\n".encode(), 0o644)
    return boot
