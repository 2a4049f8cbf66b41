"""``python -m mesh_inference.engine.embedded_server``: llama-cpp-python's OpenAI server over RPC.

Usage::

    python -m mesh_inference.engine.embedded_server --model GGUF \\
        --rpc 127.0.0.1:P1,127.0.0.1:P2 --tensor-split 0.5,0.5 \\
        --host 127.0.0.1 --port P [--ctx-size N] [--threads N] [--alias NAME]

Registers every RPC server as a ggml device (``ggml_backend_rpc_add_server``
+ ``ggml_backend_register``) *before* llama-cpp-python loads the model, since
its own ``rpc_servers`` setting is ignored in 0.3.36; then loads the model
with every layer offloaded (``n_gpu_layers=99``) split by ``--tensor-split``
and serves llama-cpp-python's FastAPI app through uvicorn, plus ``GET
/health``. The port only opens once the model is loaded, so ``/health``
answering 200 means ready. Exits 2 on bad arguments, 1 on missing libraries
or a failed load, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mesh_inference.engine.backends import (
    LOOPBACK,
    validate_alias,
    validate_ctx_size,
    validate_endpoints,
    validate_port,
    validate_tensor_split,
    validate_threads,
)
from mesh_inference.engine.embedded_rpc import GgmlError, load_ggml


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m mesh_inference.engine.embedded_server",
        description="OpenAI server (llama-cpp-python) with its layers on ggml RPC servers",
    )
    ap.add_argument("--model", type=Path, required=True, help="GGUF file")
    ap.add_argument("--rpc", required=True, help="comma-separated 127.0.0.1:PORT endpoints")
    ap.add_argument("--tensor-split", type=_floats, required=True, help="one share per endpoint")
    ap.add_argument("--host", default=LOOPBACK)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ctx-size", type=int, default=4096, help="0 = the model's own")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--alias", default="model")
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    args = ap.parse_args(argv)
    try:
        args.endpoints = validate_endpoints(args.rpc.split(","))
        args.tensor_split = validate_tensor_split(args.tensor_split, len(args.endpoints))
        validate_port(args.port, "--port")
        validate_ctx_size(args.ctx_size)
        validate_threads(args.threads)
        validate_alias(args.alias)
    except ValueError as exc:
        ap.error(str(exc))
    if args.host != LOOPBACK:
        ap.error(f"--host must be {LOOPBACK}: the mesh gateway is the only public entry")
    if not args.model.is_file():
        ap.error(f"--model {args.model} is not a file")
    if not 0 <= args.n_gpu_layers <= 100_000:
        ap.error("--n-gpu-layers must be >= 0")
    return args


def _register_rpc_devices(endpoints: list[str]) -> None:
    libs = load_ggml()
    for ep in endpoints:
        reg = libs.rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise GgmlError(f"cannot add RPC server {ep}")
        libs.ggml.ggml_backend_register(reg)


def _build_app(args: argparse.Namespace) -> Any:
    # create_app would otherwise take its settings from a file named by this variable.
    os.environ.pop("CONFIG_FILE", None)
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model_settings = ModelSettings(
        model=str(args.model),
        model_alias=args.alias,
        n_gpu_layers=args.n_gpu_layers,
        tensor_split=args.tensor_split,
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=True,
    )
    server_settings = ServerSettings(host=args.host, port=args.port)
    # Loads the model: returns only once every layer sits on its RPC device.
    app = create_app(server_settings=server_settings, model_settings=[model_settings])
    _report_alias(args.alias)

    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.add_api_route("/health", health, methods=["GET"])
    return app


def _report_alias(alias: str) -> None:
    # Responses name the model by Llama.model_path when the request names none; llama-server
    # answers with its --alias there, so make both engines look alike to API clients.
    from llama_cpp.server import app as server_app

    proxy = getattr(server_app, "_llama_proxy", None)
    llama = getattr(proxy, "_current_model", None)
    if llama is not None and hasattr(llama, "model_path"):
        llama.model_path = alias


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        _register_rpc_devices(args.endpoints)
    except GgmlError as exc:
        print(f"embedded_server: {exc}", file=sys.stderr)
        return 1
    try:
        import uvicorn

        app = _build_app(args)
    except ImportError as exc:
        print(f"embedded_server: llama-cpp-python[server] is not installed: {exc}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"embedded_server: cannot load {args.model}: {exc}", file=sys.stderr)
        return 1
    print(f"embedded_server: model loaded, serving on {args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
