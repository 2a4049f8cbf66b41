"""``python -m mesh_inference.engine.embedded_rpc``: a ggml rpc-server inside Python.

Usage::

    python -m mesh_inference.engine.embedded_rpc --host 127.0.0.1 --port P \\
        [--threads N] [--cache-dir DIR]

Serves the CPU device of llama-cpp-python's own ggml (built with
GGML_RPC=ON) through ``ggml_backend_rpc_start_server``, which blocks for the
life of the process. Exits 2 on bad arguments and 1 when the libraries are
missing or the server cannot start, with the reason on stderr.

Also the shared loader for the embedded engine::

    load_ggml(lib_dir=None) -> GgmlLibs     # libggml.so.0 + libggml-rpc.so.0, RTLD_GLOBAL
    class GgmlError(Exception)
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

from mesh_inference.engine.backends import LOOPBACK, MAX_THREADS, find_llama_cpp_lib_dir

# ggml-backend.h: enum ggml_backend_dev_type
GGML_BACKEND_DEVICE_TYPE_CPU = 0


class GgmlError(Exception):
    """llama-cpp-python's ggml libraries are missing or lack the RPC backend."""


@dataclass(frozen=True)
class GgmlLibs:
    ggml: ctypes.CDLL
    rpc: ctypes.CDLL
    lib_dir: Path


def load_ggml(lib_dir: Path | None = None) -> GgmlLibs:
    """Load llama-cpp-python's ggml so that llama_cpp, imported later, shares it.

    The ``.so.0`` sonames matter: ``libllama.so`` needs ``libggml.so.0``, and the
    dynamic loader only reuses a library already loaded under that name. Loading
    the ``libggml.so`` file copy would create a second ggml whose device
    registry llama never sees.
    """
    if lib_dir is None:
        lib_dir = find_llama_cpp_lib_dir()
        if lib_dir is None:
            raise GgmlError("llama-cpp-python is not installed (no llama_cpp/lib)")
    paths = [lib_dir / "libggml.so.0", lib_dir / "libggml-rpc.so.0"]
    for p in paths:
        if not p.exists():
            raise GgmlError(f"{p} not found: llama-cpp-python must be built with -DGGML_RPC=ON")
    try:
        ggml = ctypes.CDLL(str(paths[0]), mode=ctypes.RTLD_GLOBAL)
        rpc = ctypes.CDLL(str(paths[1]), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise GgmlError(f"cannot load ggml from {lib_dir}: {exc}") from exc
    try:
        ggml.ggml_backend_load_all.argtypes = []
        ggml.ggml_backend_load_all.restype = None
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_register.restype = None
        rpc.ggml_backend_rpc_start_server.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
        ]  # fmt: skip
        rpc.ggml_backend_rpc_start_server.restype = None
        rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    except AttributeError as exc:
        raise GgmlError(
            f"ggml in {lib_dir} lacks an RPC symbol ({exc}); rebuild with -DGGML_RPC=ON"
        ) from exc
    return GgmlLibs(ggml, rpc, lib_dir)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m mesh_inference.engine.embedded_rpc",
        description="ggml rpc-server (CPU device) on llama-cpp-python's ggml",
    )
    ap.add_argument("--host", default=LOOPBACK, help="must be 127.0.0.1: rpc-server has no auth")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=None, help="weight cache directory")
    args = ap.parse_args(argv)
    if args.host != LOOPBACK:
        ap.error(f"--host must be {LOOPBACK}: the rpc-server has no authentication")
    if not 1 <= args.port <= 65535:
        ap.error("--port must be in 1..65535")
    if not 1 <= args.threads <= MAX_THREADS:
        ap.error(f"--threads must be in 1..{MAX_THREADS}")
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        ap.error(f"--cache-dir {args.cache_dir} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        libs = load_ggml()
    except GgmlError as exc:
        print(f"embedded_rpc: {exc}", file=sys.stderr)
        return 1
    libs.ggml.ggml_backend_load_all()
    dev = libs.ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        print("embedded_rpc: ggml has no CPU device", file=sys.stderr)
        return 1
    cache: bytes | None = None
    if args.cache_dir is not None:
        try:
            args.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"embedded_rpc: cannot create cache dir: {exc}", file=sys.stderr)
            return 1
        cache = str(args.cache_dir).encode()
    devices = (ctypes.c_void_p * 1)(dev)
    endpoint = f"{args.host}:{args.port}".encode()
    print(f"embedded_rpc: serving CPU on {endpoint.decode()} threads={args.threads} "
          f"cache={args.cache_dir}", flush=True)  # fmt: skip
    # Blocks while serving; it only returns when the listening socket cannot be set up.
    libs.rpc.ggml_backend_rpc_start_server(endpoint, cache, args.threads, 1, devices)
    print(f"embedded_rpc: server on {endpoint.decode()} stopped (port in use?)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
