"""llama.cpp RPC tunnels that carry weight references instead of weight bytes.

Public API::

    host_transforms(weights)    -> TransformFactory   # host side: llama-server ⇄ tunnel
    worker_transforms(weights)  -> TransformFactory   # worker side: tunnel ⇄ rpc-server
    PASS_THROUGH                                       # neither side rewrites

The protocol work is in ``core/rpc.py`` (sans-I/O); this module only fits
it to ``net/tunnel.py``'s transform hooks, one rewriter per TCP connection
(llama.cpp keeps its state per connection). The host uses references only
toward a worker that announced the same model sha256 as its own; the
worker expands them from its own mapped copy after checking the tensor's
digest, and a worker without a mapped copy refuses any reference (the
tunnel closes, llama-server restarts) rather than let one reach its
rpc-server.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

from mesh_inference.core.rpc import (
    HostRewriter,
    RpcError,
    TensorRegion,
    WeightFile,
    WorkerExpander,
)
from mesh_inference.net.tunnel import Chunk, Transform, TransformFactory


def _identity(data: bytes) -> tuple[Sequence[Chunk], Sequence[Chunk]]:
    return (data,), ()


def PASS_THROUGH() -> tuple[Transform, Transform]:
    return _identity, _identity


def host_transforms(weights: WeightFile, held: Container[bytes] | None = None) -> TransformFactory:
    def make() -> tuple[Transform, Transform]:
        rewriter = HostRewriter(weights, held)

        def up(data: bytes) -> tuple[Sequence[Chunk], Sequence[Chunk]]:
            rewriter.feed_request(data)
            return rewriter.pop_to_worker(), rewriter.pop_to_client()

        def down(data: bytes) -> tuple[Sequence[Chunk], Sequence[Chunk]]:
            return rewriter.feed_response(data), ()

        return up, down

    return make


def worker_transforms(weights: WeightFile | None) -> TransformFactory:
    source = weights if weights is not None else NO_FILE

    def make() -> tuple[Transform, Transform]:
        expander = WorkerExpander(source)

        def up(data: bytes) -> tuple[Sequence[Chunk], Sequence[Chunk]]:
            return expander.feed(data), ()

        return up, _identity

    return make


class _NoFile:
    """The weights of a worker without the model file: every reference fails its check."""

    def region_named(self, name: str) -> TensorRegion | None:
        return None

    def region_at(self, file_offset: int, nbytes: int) -> TensorRegion | None:
        return None

    def region_with(self, sha256: bytes, nbytes: int) -> TensorRegion | None:
        return None

    def read(self, file_offset: int, nbytes: int) -> memoryview:
        raise RpcError("a weight reference reached a worker that has no copy of the model")


NO_FILE = _NoFile()
