"""Nodes on different QUIC stacks (aioquic, qh3) form a mesh: each dials the other.

The stack is chosen per process (``MESH_INFERENCE_QUIC``), so the other side
runs in a child process: an echo endpoint on the stack this one does not use.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_quic import make_side, until

from mesh_inference.core import quicstack
from mesh_inference.core.dcf import MessageType
from mesh_inference.core.identity import MeshCredentials

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("qh3") is None, reason="the 'fast' extra (qh3) is not installed"
)

ROOT = Path(__file__).resolve().parents[1]

# The child: an echo endpoint that prints its port, dials back when told, and
# reports what it saw; exits when stdin closes.
CHILD = r"""
import asyncio, sys
from mesh_inference.core import quicstack
from mesh_inference.core.identity import MeshCredentials
from test_quic import make_side

async def main():
    mesh = MeshCredentials(sys.argv[1], bytes.fromhex(sys.argv[2]))
    side = await make_side(mesh)
    print(quicstack.STACK, side.port, side.ep.node_id, flush=True)
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip():
        await side.ep.dial(line.strip())
        print("dialed", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await side.ep.close()

asyncio.run(main())
"""


def _other_stack() -> str:
    return "aioquic" if quicstack.STACK == "qh3" else "qh3"


@pytest.mark.parametrize("direction", ["we dial", "they dial"])
async def test_a_node_on_the_other_stack_joins_and_carries_a_stream(direction: str) -> None:
    mesh = MeshCredentials.generate()
    env = {
        **os.environ,
        "MESH_INFERENCE_QUIC": _other_stack(),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, mesh.mesh_id, mesh.secret.hex(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT,
    )
    assert child.stdin is not None and child.stdout is not None
    side = await make_side(mesh)
    try:
        async with asyncio.timeout(30):
            stack, port, their_id = (await child.stdout.readline()).decode().split()
        assert stack == _other_stack() != quicstack.STACK
        if direction == "we dial":
            assert await side.ep.dial(f"127.0.0.1:{port}") == their_id
            child.stdin.write(b"\n")
        else:
            child.stdin.write(f"127.0.0.1:{side.port}\n".encode())
            async with asyncio.timeout(30):
                assert (await child.stdout.readline()).strip() == b"dialed"
            await until(lambda: their_id in side.ep.peers())
        await child.stdin.drain()
        reader, writer = await side.ep.open_stream(
            their_id, MessageType.OPEN_TUNNEL, b'{"service":"rpc"}'
        )
        payload = os.urandom(3 << 20)  # several credit windows' worth of packets
        writer.write(payload)
        writer.write_eof()
        async with asyncio.timeout(60):
            echoed = await reader.read(-1)
        assert echoed == payload
        writer.close()
    finally:
        await side.ep.close()
        if child.returncode is None:
            child.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await child.wait()
            except TimeoutError:
                child.kill()
                await child.wait()


def _long_header(first: int, version: int, dcid: bytes) -> bytes:
    return bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + b"\0" * 40


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_long_header(0xC3, 1, b"abcdefgh"), quicstack.DatagramHeader(b"abcdefgh", True)),
        # Handshake packet (type 2) of v1, and an Initial of another version: routed only.
        (_long_header(0xE3, 1, b"abcdefgh"), quicstack.DatagramHeader(b"abcdefgh", False)),
        (_long_header(0xC3, 0x6B3343CF, b"12345678"), quicstack.DatagramHeader(b"12345678", False)),
        (b"\x41" + b"ABCDEFGH" + b"payload", quicstack.DatagramHeader(b"ABCDEFGH", False)),
        (b"", None),
        (b"\x01" + b"A" * 30, None),  # fixed bit clear: not QUIC v1
        (b"\x41ABC", None),  # short header shorter than a connection id
        (b"\xc3\0\0\0\1\x15" + b"x" * 40, None),  # 21-byte connection id: over RFC 9000's 20
        (b"\xc3\0\0\0\1\x08abc", None),  # truncated connection id
    ],
)
def test_datagram_headers_are_parsed_or_refused(
    data: bytes, expected: quicstack.DatagramHeader | None
) -> None:
    assert quicstack.parse_destination(data, 8) == expected
