"""The sans-I/O mesh handshake (core/handshake.py), frame by frame."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct

import pytest

from mesh_inference.core.dcf import Frame, MessageType
from mesh_inference.core.handshake import AuthFailed, Handshake
from mesh_inference.core.identity import MeshCredentials, NodeIdentity, verify_signature

MESH = MeshCredentials.generate()
ALICE, BOB, MALLORY = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
BINDING = os.urandom(32)  # what both ends of one TLS session derive (see test_session.py)


def frame(mtype: MessageType, payload: bytes) -> Frame:
    return Frame(mtype, 0, 0, payload)


def run(dialer: Handshake, acceptor: Handshake) -> list[tuple[str, MessageType]]:
    """Move frames between two handshakes until both are quiet; returns who sent what."""
    sent: list[tuple[str, MessageType]] = []
    for _ in range(10):
        moved = False
        for name, src, dst in (("d", dialer, acceptor), ("a", acceptor, dialer)):
            for mtype, payload in src.pop_frames():
                sent.append((name, mtype))
                dst.handle_frame(frame(mtype, payload))
                moved = True
        if not moved:
            break
    return sent


def pair(
    d_mesh: MeshCredentials = MESH, a_mesh: MeshCredentials = MESH
) -> tuple[Handshake, Handshake]:
    return (
        Handshake(ALICE, d_mesh, is_dialer=True, channel_binding=BINDING),
        Handshake(BOB, a_mesh, is_dialer=False, channel_binding=BINDING),
    )


def test_success_both_sides_learn_each_other() -> None:
    d, a = pair()
    sent = run(d, a)
    assert sent == [
        ("d", MessageType.HELLO),
        ("a", MessageType.HELLO),
        ("d", MessageType.PROOF),
        ("a", MessageType.PROOF),
        ("a", MessageType.WELCOME),
    ]
    assert d.complete and a.complete
    assert (d.peer_id, d.peer_pubkey_der) == (BOB.node_id, BOB.public_key_der())
    assert (a.peer_id, a.peer_pubkey_der) == (ALICE.node_id, ALICE.public_key_der())


def test_proof_matches_the_documented_transcript() -> None:
    d_nonce, a_nonce = os.urandom(32), os.urandom(32)
    d = Handshake(ALICE, MESH, is_dialer=True, channel_binding=BINDING, nonce=d_nonce)
    a = Handshake(BOB, MESH, is_dialer=False, channel_binding=BINDING, nonce=a_nonce)
    ((_, d_hello),) = d.pop_frames()
    a.handle_frame(frame(MessageType.HELLO, d_hello))
    ((_, a_hello),) = a.pop_frames()
    assert json.loads(a_hello) == {
        "v": 1,
        "node_id": BOB.node_id,
        "pubkey": base64.b64encode(BOB.public_key_der()).decode(),
        "mesh_id": MESH.mesh_id,
        "nonce": base64.b64encode(a_nonce).decode(),
    }
    d.handle_frame(frame(MessageType.HELLO, a_hello))
    ((_, proof),) = d.pop_frames()
    transcript = (
        b"mesh-inference/1"
        + MESH.mesh_id.encode()
        + struct.pack(">I", len(BINDING))
        + BINDING
        + struct.pack(">I", len(d_hello))
        + d_hello
        + struct.pack(">I", len(a_hello))
        + a_hello
    )
    msg = json.loads(proof)
    mac = base64.b64decode(msg["mac"])
    assert mac == hmac.new(MESH.secret, transcript + b"dialer", hashlib.sha256).digest()
    assert verify_signature(ALICE.public_key_der(), base64.b64decode(msg["sig"]),
                            transcript + b"dialer")


def test_wrong_secret_fails_at_the_acceptor_before_it_proves_anything() -> None:
    wrong = MeshCredentials(MESH.mesh_id, os.urandom(32))
    d, a = pair(d_mesh=wrong)
    with pytest.raises(AuthFailed, match="mesh secret"):
        run(d, a)
    assert not a.complete and a.failed and a.pop_frames() == []


def test_acceptor_with_wrong_secret_fails_at_the_dialer() -> None:
    wrong = MeshCredentials(MESH.mesh_id, os.urandom(32))
    d, a = pair(a_mesh=wrong)
    with pytest.raises(AuthFailed, match="mesh secret"):
        run(d, a)  # the acceptor rejects the dialer's proof first
    assert not d.complete


def test_wrong_mesh_id_fails_before_the_acceptor_says_anything() -> None:
    d, a = pair(a_mesh=MeshCredentials.generate())
    ((t, hello),) = d.pop_frames()
    with pytest.raises(AuthFailed, match="another mesh"):
        a.handle_frame(frame(t, hello))
    assert a.pop_frames() == []


def _tamper_hello(payload: bytes, **changes: object) -> bytes:
    msg = json.loads(payload)
    msg.update(changes)
    return json.dumps(msg).encode()


def test_node_id_must_match_the_public_key() -> None:
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    with pytest.raises(AuthFailed, match="node id does not match"):
        a.handle_frame(frame(t, _tamper_hello(hello, node_id=MALLORY.node_id)))


def test_pubkey_swapped_for_another_node_id_fails() -> None:
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    swapped = _tamper_hello(hello, pubkey=base64.b64encode(MALLORY.public_key_der()).decode())
    with pytest.raises(AuthFailed, match="node id does not match"):
        a.handle_frame(frame(t, swapped))


def test_mallory_claiming_alices_identity_fails_on_the_signature() -> None:
    # Mallory knows the secret and copies Alice's key and id, but cannot sign as Alice.
    d = Handshake(MALLORY, MESH, is_dialer=True, channel_binding=BINDING)
    a = Handshake(BOB, MESH, is_dialer=False, channel_binding=BINDING)
    ((t, hello),) = d.pop_frames()
    d_alice = Handshake(ALICE, MESH, is_dialer=True, channel_binding=BINDING)
    ((_, alice_hello),) = d_alice.pop_frames()
    forged_hello = _tamper_hello(
        hello,
        node_id=ALICE.node_id,
        pubkey=json.loads(alice_hello)["pubkey"],
    )
    a.handle_frame(frame(t, forged_hello))
    ((_, a_hello),) = a.pop_frames()
    # Mallory computes a correct MAC over the real transcript, signed with her own key.
    transcript = (
        b"mesh-inference/1" + MESH.mesh_id.encode()
        + struct.pack(">I", len(BINDING)) + BINDING
        + struct.pack(">I", len(forged_hello)) + forged_hello
        + struct.pack(">I", len(a_hello)) + a_hello + b"dialer"
    )
    mac = hmac.new(MESH.secret, transcript, hashlib.sha256).digest()
    proof = json.dumps({
        "mac": base64.b64encode(mac).decode(),
        "sig": base64.b64encode(MALLORY.sign(transcript)).decode(),
    }).encode()
    with pytest.raises(AuthFailed, match="signature"):
        a.handle_frame(frame(MessageType.PROOF, proof))
    assert not a.complete


def test_tampered_signature_fails() -> None:
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    a.handle_frame(frame(t, hello))
    for t2, p2 in a.pop_frames():
        d.handle_frame(frame(t2, p2))
    ((t3, proof),) = d.pop_frames()
    msg = json.loads(proof)
    sig = bytearray(base64.b64decode(msg["sig"]))
    sig[-1] ^= 1
    msg["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(AuthFailed, match="signature"):
        a.handle_frame(frame(t3, json.dumps(msg).encode()))


def test_a_relay_between_two_tls_sessions_fails_on_both_sides() -> None:
    # Mallory terminates TLS with Alice and, separately, with Bob, and forwards
    # the control frames: the two TLS sessions have different bindings.
    alice_side, bob_side = os.urandom(32), os.urandom(32)
    n_alice, n_bob = os.urandom(32), os.urandom(32)
    d = Handshake(ALICE, MESH, is_dialer=True, channel_binding=alice_side, nonce=n_alice)
    a = Handshake(BOB, MESH, is_dialer=False, channel_binding=bob_side, nonce=n_bob)
    ((t, hello),) = d.pop_frames()
    a.handle_frame(frame(t, hello))
    ((t2, a_hello),) = a.pop_frames()
    d.handle_frame(frame(t2, a_hello))  # Bob's real Hello: nothing to refuse in it
    ((t3, d_proof),) = d.pop_frames()
    with pytest.raises(AuthFailed, match=r"mesh secret \(or the session is relayed\)"):
        a.handle_frame(frame(t3, d_proof))
    assert a.pop_frames() == [] and not a.complete
    # The other way round: an acceptor Proof over the very same Hellos, but bound
    # to Bob's TLS session, is worthless to Alice.
    bob_proof = Handshake(BOB, MESH, is_dialer=False, channel_binding=bob_side, nonce=n_bob)
    bob_proof.handle_frame(frame(MessageType.HELLO, hello))
    bob_proof.pop_frames()
    twin_d2 = Handshake(ALICE, MESH, is_dialer=True, channel_binding=bob_side, nonce=n_alice)
    twin_d2.pop_frames()
    twin_d2.handle_frame(frame(MessageType.HELLO, a_hello))
    ((_, twin_proof),) = twin_d2.pop_frames()
    bob_proof.handle_frame(frame(MessageType.PROOF, twin_proof))
    ((_, b_proof), _welcome) = bob_proof.pop_frames()
    with pytest.raises(AuthFailed, match="mesh secret"):
        d.handle_frame(frame(MessageType.PROOF, b_proof))
    assert not d.complete


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"v": 2}, "version"),
        ({"mesh_id": "0" * 16}, "another mesh"),
        ({"node_id": "0" * 16}, "node id does not match"),
        ({"pubkey": base64.b64encode(MALLORY.public_key_der()).decode()}, "node id does not match"),
    ],
)
def test_dialer_checks_the_acceptors_hello_before_it_proves(
    changes: dict[str, object], match: str
) -> None:
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    a.handle_frame(frame(t, hello))
    ((t2, a_hello),) = a.pop_frames()
    with pytest.raises(AuthFailed, match=match):
        d.handle_frame(frame(t2, _tamper_hello(a_hello, **changes)))
    assert d.pop_frames() == [] and d.failed


def test_channel_binding_length_is_checked() -> None:
    with pytest.raises(ValueError, match="channel binding"):
        Handshake(ALICE, MESH, is_dialer=True, channel_binding=b"short")


def test_dialer_must_not_accept_welcome_before_a_valid_proof() -> None:
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    a.handle_frame(frame(t, hello))
    ((t2, a_hello),) = a.pop_frames()
    d.handle_frame(frame(t2, a_hello))
    with pytest.raises(AuthFailed, match="unexpected WELCOME"):
        d.handle_frame(frame(MessageType.WELCOME, b"{}"))
    assert not d.complete


@pytest.mark.parametrize(
    "mtype",
    [MessageType.PROOF, MessageType.WELCOME, MessageType.GOSSIP, MessageType.HEARTBEAT],
)
def test_acceptor_rejects_anything_but_hello_first(mtype: MessageType) -> None:
    a = Handshake(BOB, MESH, is_dialer=False, channel_binding=BINDING)
    with pytest.raises(AuthFailed, match="unexpected"):
        a.handle_frame(frame(mtype, b"{}"))


def test_acceptor_rejects_a_second_hello() -> None:
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    a.handle_frame(frame(t, hello))
    with pytest.raises(AuthFailed, match="unexpected HELLO"):
        a.handle_frame(frame(t, hello))


def test_frames_after_completion_or_failure_are_rejected() -> None:
    d, a = pair()
    run(d, a)
    with pytest.raises(AuthFailed, match="after the handshake ended"):
        a.handle_frame(frame(MessageType.HELLO, b"{}"))
    bad = Handshake(BOB, MESH, is_dialer=False, channel_binding=BINDING)
    with pytest.raises(AuthFailed):
        bad.handle_frame(frame(MessageType.HELLO, b"junk"))
    with pytest.raises(AuthFailed, match="after the handshake ended"):
        bad.handle_frame(frame(MessageType.HELLO, b"{}"))


def test_replayed_proof_from_another_session_fails() -> None:
    d1, a1 = pair()
    ((t, hello1),) = d1.pop_frames()
    a1.handle_frame(frame(t, hello1))
    for t2, p2 in a1.pop_frames():
        d1.handle_frame(frame(t2, p2))
    ((_, proof1),) = d1.pop_frames()
    # An eavesdropper replays Alice's Hello and Proof to Bob: Bob's new nonce makes
    # the transcript differ, so the old proof is worthless.
    a2 = Handshake(BOB, MESH, is_dialer=False, channel_binding=BINDING)
    a2.handle_frame(frame(t, hello1))
    a2.pop_frames()
    with pytest.raises(AuthFailed, match="mesh secret"):
        a2.handle_frame(frame(MessageType.PROOF, proof1))


def test_reflected_proof_fails() -> None:
    # The dialer's own proof echoed back as the acceptor's: the role differs.
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    a.handle_frame(frame(t, hello))
    ((t2, a_hello),) = a.pop_frames()
    d.handle_frame(frame(t2, a_hello))
    ((t3, proof),) = d.pop_frames()
    with pytest.raises(AuthFailed, match="mesh secret"):
        d.handle_frame(frame(t3, proof))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\x00",
        b"[]",
        b"{}",
        b"x" * 5000,
        json.dumps({"v": 2}).encode(),
        json.dumps({"v": True, "mesh_id": MESH.mesh_id}).encode(),
    ],
)
def test_garbage_hello_fails_cleanly(payload: bytes) -> None:
    a = Handshake(BOB, MESH, is_dialer=False, channel_binding=BINDING)
    with pytest.raises(AuthFailed):
        a.handle_frame(frame(MessageType.HELLO, payload))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("nonce", base64.b64encode(b"short").decode(), "nonce"),
        ("nonce", "%%%", "nonce"),
        ("pubkey", base64.b64encode(b"not a key").decode(), "P-256"),
        ("pubkey", 12, "public key"),
    ],
)
def test_bad_hello_fields(field: str, value: object, match: str) -> None:
    d, a = pair()
    ((t, hello),) = d.pop_frames()
    with pytest.raises(AuthFailed, match=match):
        a.handle_frame(frame(t, _tamper_hello(hello, **{field: value})))


def test_connecting_to_ourselves_fails() -> None:
    d = Handshake(ALICE, MESH, is_dialer=True, channel_binding=BINDING)
    a = Handshake(ALICE, MESH, is_dialer=False, channel_binding=BINDING)
    with pytest.raises(AuthFailed, match="ourselves"):
        run(d, a)


def test_error_frame_from_the_acceptor_is_reported() -> None:
    d, _ = pair()
    d.pop_frames()
    with pytest.raises(AuthFailed, match="refused by peer: busy"):
        d.handle_frame(frame(MessageType.ERROR, b'{"reason":"busy"}'))
