"""The QUIC stack seam: aioquic (the default) or qh3 (the ``fast`` extra), one API.

Public API::

    STACK                      # "aioquic" or "qh3": what this process uses
    QuicConfiguration, QuicConnection, NetworkAddress, events   # from that stack
    configure_server_identity(cfg, identity)   # the TLS certificate this node serves
    channel_binding(quic, label)               # a per-session secret both ends derive
    parse_destination(datagram, cid_length)    # routing facts from a datagram's header

qh3 is a fork of aioquic with the same module layout and a Rust core for
packet handling, which is where aioquic spends most of its time (our measured
1452-byte bulk rate: aioquic ~60 MB/s, qh3 several times that; see
docs/benchmarks.md). Both are sans-I/O: a ``QuicConnection`` takes datagrams
and an explicit ``now``. Choice: ``MESH_INFERENCE_QUIC=aioquic|qh3|auto``
(default ``auto``: qh3 when installed). The choice is per process; the wire
is plain QUIC v1 with TLS 1.3, so nodes on different stacks talk.

Three differences are bridged here and nowhere else:

- qh3 takes the certificate as PEM through ``load_cert_chain`` and refuses a
  self-signed leaf, so it gets a leaf for the node's key issued by a
  throwaway CA made at start. Certificates are never checked by peers
  anyway: the handshake proves the node key, bound to this TLS session.
- An aioquic dialer pads its ClientHello so that a qh3 acceptor can answer it
  (see :func:`configure_client`).
- The datagram header is parsed here (RFC 9000 §17) rather than with the
  stacks' own parsers, whose buffer types differ; routing needs only the
  destination connection id, and for new connections the packet type and
  version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh_inference.core.identity import NodeIdentity, ca_issued_certificate_pem

if TYPE_CHECKING:
    from aioquic.quic import events as events
    from aioquic.quic.configuration import QuicConfiguration as QuicConfiguration
    from aioquic.quic.connection import NetworkAddress as NetworkAddress
    from aioquic.quic.connection import QuicConnection as QuicConnection
    from aioquic.quic.connection import QuicConnectionError as _StackError

ENV = "MESH_INFERENCE_QUIC"
STACKS = ("aioquic", "qh3")


def _choose(wanted: str) -> str:
    if wanted not in (*STACKS, "auto"):
        raise ValueError(f"{ENV} must be one of aioquic, qh3, auto; not {wanted!r}")
    if wanted != "auto":
        return wanted
    try:
        import qh3  # noqa: F401
    except ImportError:
        return "aioquic"
    return "qh3"


STACK = _choose(os.environ.get(ENV, "auto").strip().lower() or "auto")

if not TYPE_CHECKING:
    if STACK == "qh3":
        from qh3.quic import events
        from qh3.quic.configuration import QuicConfiguration
        from qh3.quic.connection import NetworkAddress, QuicConnection
        from qh3.quic.connection import QuicConnectionError as _StackError
    else:
        from aioquic.quic import events
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import NetworkAddress, QuicConnection
        from aioquic.quic.connection import QuicConnectionError as _StackError

# What the stack raises from an application call (send, ping, reset) on a connection it
# has already closed -- qh3 does ("connection is closed") before the application has seen
# ConnectionTerminated; the session turns it into the end of that connection.
STACK_ERRORS: tuple[type[Exception], ...] = (_StackError,)

__all__ = [
    "STACK",
    "STACK_ERRORS",
    "NetworkAddress",
    "QuicConfiguration",
    "QuicConnection",
    "channel_binding",
    "configure_client",
    "configure_server_identity",
    "events",
    "parse_destination",
]

QUIC_V1 = 0x00000001
SMALLEST_INITIAL = 1200  # RFC 9000 §14.1: a client's Initial datagram is at least this big


def configure_client(cfg: QuicConfiguration) -> None:
    """Client settings every stack needs to reach every other."""
    if STACK == "qh3":
        # qh3 probes the path MTU with a 1472-byte datagram by default; our datagrams
        # stay within max_datagram_size (1452 B: a LAN's limit, tunnels and VPNs less).
        qh3_cfg: Any = cfg
        qh3_cfg.probe_datagram_size = False
    if STACK == "aioquic":
        # A qh3 server fails ("packet builder capacity exhausted") on aioquic's
        # one-datagram ClientHello; aioquic's padded one (two datagrams) works,
        # measured with both orders of the two stacks. Costs ~1.3 kB once per dial.
        cfg.quantum_readiness_test = True


def configure_server_identity(cfg: QuicConfiguration, identity: NodeIdentity) -> None:
    """Give a server configuration the TLS certificate and key of this node."""
    if STACK == "qh3":
        chain, key = ca_issued_certificate_pem(identity)
        qh3_cfg: Any = cfg  # qh3's load_cert_chain takes PEM bytes; aioquic's stubs say paths
        qh3_cfg.load_cert_chain(chain, key)
    else:
        cfg.certificate = identity.certificate
        cfg.private_key = identity.private_key


def channel_binding(quic: QuicConnection, label: bytes) -> bytes | None:
    """A secret derived from this TLS session's key schedule (equal on both ends)."""
    tls: Any = quic.tls
    key_schedule = None if tls is None else tls.key_schedule
    if key_schedule is None:
        return None
    return bytes(key_schedule.derive_secret(label))


@dataclass(frozen=True, slots=True)
class DatagramHeader:
    destination_cid: bytes
    is_initial: bool  # a long-header Initial packet of QUIC v1 (may open a connection)


def parse_destination(data: bytes, cid_length: int) -> DatagramHeader | None:
    """The first packet's destination connection id; None if the header is malformed."""
    if not data:
        return None
    first = data[0]
    if not first & 0x40:  # the fixed bit (RFC 9000 §17.2) is 1 in every v1 packet
        return None
    if first & 0x80:  # long header: version, then length-prefixed connection ids
        if len(data) < 6:
            return None
        version = int.from_bytes(data[1:5], "big")
        dcid_len = data[5]
        if dcid_len > 20 or len(data) < 6 + dcid_len:
            return None
        dcid = bytes(data[6 : 6 + dcid_len])
        is_initial = version == QUIC_V1 and (first & 0x30) == 0
        return DatagramHeader(dcid, is_initial)
    if len(data) < 1 + cid_length:
        return None
    return DatagramHeader(bytes(data[1 : 1 + cid_length]), False)
