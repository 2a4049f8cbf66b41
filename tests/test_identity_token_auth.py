"""Identity on disk, join tokens, and the sans-I/O handshake."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from mesh_inference.auth import AuthFailed, Handshake
from mesh_inference.dcf import Frame, MessageType
from mesh_inference.identity import (
    IdentityError,
    MeshCredentials,
    NodeIdentity,
    load_or_create_identity,
    load_or_create_mesh,
    node_id_for,
    verify_signature,
)
from mesh_inference.jointoken import InvalidJoinToken, JoinToken


# ---------------------------------------------------------------- identity
def test_identity_persists_and_node_id_is_key_hash(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path)
    b = load_or_create_identity(tmp_path)
    assert a.node_id == b.node_id == node_id_for(a.public_key_der())
    assert len(a.node_id) == 16 and int(a.node_id, 16) >= 0
    assert stat.S_IMODE(os.stat(tmp_path / "node.key").st_mode) == 0o600
    sig = a.sign(b"data")
    assert verify_signature(b.public_key_der(), sig, b"data")
    assert not verify_signature(b.public_key_der(), sig, b"other")
    assert not verify_signature(b"garbage", sig, b"data")


def test_corrupt_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_text("not a key")
    with pytest.raises(IdentityError, match="node.key"):
        load_or_create_identity(tmp_path)


def test_mesh_credentials(tmp_path: Path) -> None:
    first = load_or_create_mesh(tmp_path, None)
    assert load_or_create_mesh(tmp_path, None) == first
    assert stat.S_IMODE(os.stat(tmp_path / "mesh.json").st_mode) == 0o600
    other = MeshCredentials.generate()
    token = JoinToken(other.mesh_id, other.secret, ("127.0.0.1:9337",))
    with pytest.raises(IdentityError, match="belongs to mesh"):
        load_or_create_mesh(tmp_path, token, replace=False)
    assert load_or_create_mesh(tmp_path, token) == other
    (tmp_path / "mesh.json").write_text("{")
    with pytest.raises(IdentityError, match="corrupt"):
        load_or_create_mesh(tmp_path, None)


# ---------------------------------------------------------------- join token
def test_token_round_trip() -> None:
    creds = MeshCredentials.generate()
    tok = JoinToken(creds.mesh_id, creds.secret, ("192.168.1.5:9337", "[::1]:9000", "host.lan:1"))
    text = tok.encode()
    assert text.startswith("mi1.")
    assert JoinToken.decode(text) == tok
    assert JoinToken.decode(f"  {text[:20]}\n{text[20:]} ") == tok


def _raw(obj: object) -> str:
    return "mi1." + base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


GOOD = {"v": 1, "mesh": "0123456789abcdef", "secret": "ab" * 32, "addrs": ["127.0.0.1:1"]}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("xyz", "should start with"),
        ("mi1.%%%", "damaged"),
        ("mi1." + base64.urlsafe_b64encode(b"not json").decode(), "damaged"),
        (_raw([1, 2]), "not an object"),
        (_raw({**GOOD, "v": 2}), "version"),
        (_raw({**GOOD, "mesh": "XYZ"}), "mesh id"),
        (_raw({**GOOD, "secret": "ab"}), "32 bytes"),
        (_raw({**GOOD, "secret": "zz" * 32}), "32 bytes"),
        (_raw({**GOOD, "addrs": []}), "no address"),
        (_raw({**GOOD, "addrs": ["host"]}), "host:port"),
        (_raw({**GOOD, "addrs": ["h:0"]}), "port"),
        (_raw({**GOOD, "addrs": ["h:70000"]}), "port"),
        (_raw({**GOOD, "addrs": ["[zz]:1"]}), "IPv6"),
        (_raw({**GOOD, "addrs": ["bad host:1"]}), "host name"),
        (_raw({**GOOD, "addrs": ["h:1"] * 17}), "more than"),
        ("mi1." + "A" * 5000, "too long"),
    ],
)
def test_bad_tokens(text: str, match: str) -> None:
    with pytest.raises(InvalidJoinToken, match=match):
        JoinToken.decode(text)


# ---------------------------------------------------------------- handshake
def run(dialer: Handshake, acceptor: Handshake) -> None:
    """Move frames between two handshakes until both are quiet."""
    seq = 0
    for _ in range(10):
        moved = False
        for src, dst in ((dialer, acceptor), (acceptor, dialer)):
            for mtype, payload in src.pop_frames():
                dst.handle_frame(Frame(mtype, seq, 0, payload))
                seq += 1
                moved = True
        if not moved:
            return


def test_handshake_succeeds_and_learns_peer_ids() -> None:
    mesh = MeshCredentials.generate()
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    d, acc = Handshake(a, mesh, is_dialer=True), Handshake(b, mesh, is_dialer=False)
    run(d, acc)
    assert d.complete and acc.complete
    assert d.peer_id == b.node_id and acc.peer_id == a.node_id


def test_wrong_secret_fails_at_the_acceptor_before_it_proves_anything() -> None:
    mesh = MeshCredentials.generate()
    wrong = MeshCredentials(mesh.mesh_id, os.urandom(32))
    d = Handshake(NodeIdentity.generate(), wrong, is_dialer=True)
    acc = Handshake(NodeIdentity.generate(), mesh, is_dialer=False)
    with pytest.raises(AuthFailed, match="mesh secret"):
        run(d, acc)
    assert not acc.complete
    assert all(t != MessageType.PROOF for t, _ in acc.pop_frames())


def test_other_mesh_fails() -> None:
    d = Handshake(NodeIdentity.generate(), MeshCredentials.generate(), is_dialer=True)
    acc = Handshake(NodeIdentity.generate(), MeshCredentials.generate(), is_dialer=False)
    with pytest.raises(AuthFailed, match="another mesh"):
        run(d, acc)


def test_node_id_must_match_key() -> None:
    mesh = MeshCredentials.generate()
    d = Handshake(NodeIdentity.generate(), mesh, is_dialer=True)
    acc = Handshake(NodeIdentity.generate(), mesh, is_dialer=False)
    ((mtype, payload),) = d.pop_frames()
    hello = json.loads(payload)
    hello["node_id"] = "0" * 16
    with pytest.raises(AuthFailed, match="node id"):
        acc.handle_frame(Frame(mtype, 0, 0, json.dumps(hello).encode()))


def test_signature_from_another_key_fails() -> None:
    mesh = MeshCredentials.generate()
    a, b, mallory = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    d, acc = Handshake(a, mesh, is_dialer=True), Handshake(b, mesh, is_dialer=False)
    ((t, hello),) = d.pop_frames()
    acc.handle_frame(Frame(t, 0, 0, hello))
    for t2, p2 in acc.pop_frames():
        d.handle_frame(Frame(t2, 0, 0, p2))
    ((t3, proof),) = d.pop_frames()
    forged = json.loads(proof)
    forged["sig"] = base64.b64encode(mallory.sign(b"x")).decode()
    with pytest.raises(AuthFailed, match="signature"):
        acc.handle_frame(Frame(t3, 1, 0, json.dumps(forged).encode()))


@pytest.mark.parametrize("mtype", [MessageType.PROOF, MessageType.WELCOME, MessageType.GOSSIP])
def test_out_of_order_frames_fail(mtype: MessageType) -> None:
    mesh = MeshCredentials.generate()
    acc = Handshake(NodeIdentity.generate(), mesh, is_dialer=False)
    with pytest.raises(AuthFailed, match="unexpected"):
        acc.handle_frame(Frame(mtype, 0, 0, b"{}"))


def test_replayed_proof_from_another_session_fails() -> None:
    mesh = MeshCredentials.generate()
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    d1, acc1 = Handshake(a, mesh, is_dialer=True), Handshake(b, mesh, is_dialer=False)
    ((t, hello1),) = d1.pop_frames()
    acc1.handle_frame(Frame(t, 0, 0, hello1))
    for t2, p2 in acc1.pop_frames():
        d1.handle_frame(Frame(t2, 0, 0, p2))
    ((_, proof1),) = d1.pop_frames()
    # A new session from the same dialer key has new nonces: the old proof is worthless.
    acc2_again = Handshake(b, mesh, is_dialer=False)
    acc2_again.handle_frame(Frame(t, 0, 0, hello1))
    acc2_again.pop_frames()
    with pytest.raises(AuthFailed):
        acc2_again.handle_frame(Frame(MessageType.PROOF, 1, 0, proof1))


def test_garbage_hello_fails() -> None:
    acc = Handshake(NodeIdentity.generate(), MeshCredentials.generate(), is_dialer=False)
    with pytest.raises(AuthFailed):
        acc.handle_frame(Frame(MessageType.HELLO, 0, 0, b"\xff\x00"))
