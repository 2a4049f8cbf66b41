"""Command line: ``mesh-inference [OPTIONS]`` runs a node; subcommands inspect one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from mesh_inference import __version__
from mesh_inference.cli.models import models
from mesh_inference.machine.logs import PROGRESS_LOGGER, configure_logging

DEFAULT_PORT = 9337


def _console_dir() -> Path | None:
    # console/ sits next to the package in a source checkout (this file is
    # mesh_inference/cli/main.py); a wheel installs it under <prefix>/share.
    package = Path(__file__).resolve().parents[1]
    shared = Path(sys.prefix) / "share" / "mesh-inference" / "console"
    for cand in (package.parent / "console", package / "console", shared):
        if (cand / "index.html").is_file():
            return cand
    return None


def _parse_port(value: int, flag: str) -> int:
    if not 0 <= value <= 65535:
        raise click.BadParameter(
            f"{value} is not a port (0-65535; 0 = any free port)", param_hint=flag
        )
    return value


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    "model_ref",
    metavar="MODEL",
    help="Model to serve: a GGUF path, a file in ./local-models (or $MESH_INFERENCE_MODELS), "
    "a catalog name such as smollm2-135m, or hf://owner/repo/file.gguf.",
)
@click.option(
    "--join",
    "join_token",
    metavar="TOKEN",
    help="Join an existing mesh with the token another node printed "
    "(also in its <state-dir>/join-token).",
)
@click.option(
    "--client",
    is_flag=True,
    help="Contribute no memory and run no engine; only serve the API locally, "
    "proxied to the mesh's host.",
)
@click.option(
    "--http-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the API and console listen on (0.0.0.0 exposes them to the network).",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="Another host name the API and console answer to (repeatable), e.g. a DNS name "
    "or a reverse proxy's; loopback, this machine's name and addresses always work. "
    "Requests for any other name are refused (DNS-rebinding protection).",
)
@click.option(
    "--api-key",
    envvar="MESH_INFERENCE_API_KEY",
    metavar="KEY",
    help="Require 'Authorization: Bearer KEY' on the OpenAI API (/v1/*); also read from "
    "$MESH_INFERENCE_API_KEY. Prefer --api-key-file: a command line is visible to every user.",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="Read the API key from PATH at start (surrounding whitespace stripped; "
    "make the file mode 0600).",
)
@click.option(
    "--insecure-public",
    is_flag=True,
    help="Serve the API on a non-loopback --http-host without an API key (anyone who can "
    "reach the port can use it). Without it such a node refuses to start.",
)
@click.option(
    "--model-alias",
    "model_aliases",
    multiple=True,
    metavar="NAME",
    help="Another name clients may give as 'model' for the served model (repeatable); "
    "listed by /v1/models. Any other name gets 404 model_not_found.",
)
@click.option(
    "--request-wait",
    type=click.FloatRange(0, 600),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long an API request waits for the mesh to serve again (no host yet, engine "
    "relaunching, a node died mid-answer) before it fails; a broken stream is continued.",
)
@click.option(
    "--http-port",
    default=DEFAULT_PORT,
    show_default=True,
    type=int,
    help="TCP port of the OpenAI-compatible API and the console (0 = ephemeral).",
)
@click.option(
    "--quic-host", default="0.0.0.0", show_default=True, help="Address the QUIC mesh port binds to."
)
@click.option(
    "--quic-port",
    default=DEFAULT_PORT,
    show_default=True,
    type=int,
    help="UDP port for the QUIC mesh (0 = ephemeral).",
)
@click.option(
    "--advertise",
    "advertise_host",
    metavar="HOST",
    help="Address other nodes should dial (put in the join token); default: all local IPv4s.",
)
@click.option(
    "--max-vram",
    type=float,
    metavar="GB",
    help="Memory this node offers the mesh in GB, instead of the detected free VRAM "
    "(or available RAM on CPU-only nodes).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".mesh-inference",
    show_default=True,
    help="Directory for the node's identity, mesh secret, join token and logs; "
    "use one per node to run several nodes on one machine.",
)
@click.option(
    "--no-mdns", is_flag=True, help="Do not advertise or discover nodes with mDNS/zeroconf."
)
@click.option(
    "--engine",
    "backend",
    type=click.Choice(["auto", "bin", "embedded"]),
    default="auto",
    show_default=True,
    help="Inference engine: real llama.cpp binaries (bin), llama-cpp-python (embedded), "
    "or the fastest available (auto = bin).",
)
@click.option(
    "--llama-bin",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Directory holding llama-server and rpc-server/ggml-rpc-server.",
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Local models directory (default: $MESH_INFERENCE_MODELS or ./local-models).",
)
@click.option(
    "--no-model-copy",
    is_flag=True,
    help="Never copy the mesh model's file from a peer: the host sends this node its "
    "share of the weights over RPC on every load (for machines without disk space).",
)
@click.option("--name", help="Human-readable node name (default: host name).")
@click.option(
    "--ctx-size",
    default=4096,
    show_default=True,
    type=click.IntRange(256, 1 << 20),
    help="Context size of the engine.",
)
@click.option("--threads", type=click.IntRange(1, 1024), help="CPU threads for the engine.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr: human text, or one JSON object per line "
    "(ts, level, logger, msg, exception) for log collectors.",
)
@click.version_option(__version__, prog_name="mesh-inference")
@click.pass_context
def cli(ctx: click.Context, /, **opts: Any) -> None:
    """Pool the GPUs and CPUs of several machines into one llama.cpp inference service.

    Run it on every machine: the first with --model, the others with --join TOKEN.
    Every node serves the OpenAI API and the web console on --http-port.
    """
    if ctx.invoked_subcommand is not None:
        return
    _run_node(**opts)


def _run_node(**opts: Any) -> None:
    from mesh_inference.core.jointoken import InvalidJoinToken, JoinToken
    from mesh_inference.core.membership import MembershipTimers
    from mesh_inference.machine.state import load_or_create_console_token
    from mesh_inference.models.refs import ModelError, default_models_dir
    from mesh_inference.node import Node, NodeConfig

    level = logging.WARNING - 10 * min(2, opts["verbose"])
    configure_logging(
        min(level, logging.INFO) if opts["verbose"] else logging.WARNING, opts["log_format"]
    )
    _parse_port(opts["http_port"], "--http-port")
    _parse_port(opts["quic_port"], "--quic-port")
    api_key = _load_api_key(opts["api_key"], opts["api_key_file"])
    from mesh_inference.api.security import public_bind_problem

    problem = public_bind_problem(opts["http_host"], api_key, opts["insecure_public"])
    if problem is not None:
        raise click.UsageError(problem)
    if api_key is None and opts["insecure_public"]:
        click.echo(f"warning: the API on {opts['http_host']} has no key (--insecure-public)",
                   err=True)
    aliases = tuple(dict.fromkeys(a.strip() for a in opts["model_aliases"]))
    if any(not a or len(a) > 256 for a in aliases):
        raise click.BadParameter("an alias is 1-256 characters", param_hint="--model-alias")
    if opts["max_vram"] is not None and not 0 <= opts["max_vram"] <= 1 << 20:
        raise click.BadParameter("must be between 0 and 1048576", param_hint="--max-vram")
    token = None
    if opts["join_token"]:
        try:
            token = JoinToken.decode(opts["join_token"])
        except InvalidJoinToken as exc:
            raise click.BadParameter(str(exc), param_hint="--join") from None
    if opts["model_ref"] is None and token is None and not opts["client"]:
        raise click.UsageError(
            "start the first node with --model MODEL, the others with --join TOKEN"
        )
    if opts["client"] and token is None:
        raise click.UsageError(
            "--client needs --join TOKEN: a client contributes nothing by itself"
        )
    import socket

    config = NodeConfig(
        state_dir=opts["state_dir"],
        model_ref=opts["model_ref"],
        join=token,
        client=opts["client"],
        name=opts["name"] or socket.gethostname(),
        http_host=opts["http_host"],
        http_port=opts["http_port"],
        allowed_hosts=tuple(opts["allow_hosts"]),
        quic_host=opts["quic_host"],
        quic_port=opts["quic_port"],
        advertise_host=opts["advertise_host"],
        max_vram_gb=opts["max_vram"],
        mdns=not opts["no_mdns"],
        backend=opts["backend"],
        llama_bin=opts["llama_bin"],
        models_dir=opts["models_dir"] or default_models_dir(),
        ctx_size=opts["ctx_size"],
        threads=opts["threads"],
        timers=MembershipTimers(),
        console_dir=_console_dir(),
        no_model_copy=opts["no_model_copy"],
        api_key=api_key,
        insecure_public=opts["insecure_public"],
        model_aliases=aliases,
        request_wait=opts["request_wait"],
    )

    if config.model_ref is not None:
        _fetch_model_if_needed(config.model_ref, config.models_dir)

    for name in opts["allow_hosts"]:
        if not name.strip() or any(c in name for c in "/@ \t"):
            raise click.BadParameter(f"{name!r} is not a host name", param_hint="--allow-host")

    async def main() -> int:
        node = Node(config)
        try:
            await node.start()
        except (ModelError, ValueError, OSError) as exc:
            await node.stop()
            click.echo(f"error: {exc}", err=True)
            return 2
        token = node.join_token.encode() if node.join_token else "-"
        status = node.status()
        # The node created it at start; the URL logs this browser in (see api/security.py).
        console_token = load_or_create_console_token(config.state_dir)
        click.echo(f"mesh-inference {__version__}")
        click.echo(f"  node id    {node.node_id}  ({status['node']['role']})")
        click.echo(f"  console    {node.http_url}/?token={console_token}")
        keyed = "; needs the API key" if api_key is not None else ""
        click.echo(f"  API        {node.http_url}/v1  (OpenAI-compatible{keyed})")
        click.echo(f"  QUIC       udp/{node.quic_port}")
        click.echo(f"  join token {node.join_token.encode() if node.join_token else '-'}")
        click.echo(
            f"  join with  mesh-inference --join {token}"
        )
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():  # asked twice: stop waiting for requests in flight
                node.skip_drain()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        as_log = opts["log_format"] == "json"  # then stderr carries JSON lines only
        watcher = asyncio.ensure_future(_report_progress(node, as_log=as_log))
        await stop.wait()
        watcher.cancel()
        # Graceful leave (Node.stop): requests in flight finish (at most 10 s; a second
        # Ctrl-C cuts it short), new ones get 503, peers hear Goodbye, engines stop.
        if as_log:
            logging.getLogger(PROGRESS_LOGGER).info("stopping")
        else:
            click.echo("stopping… (Ctrl-C again to stop without waiting for requests)",
                       err=True)
        await node.stop()
        return 0

    sys.exit(_run_loop(main()))


def _load_api_key(key: str | None, key_file: Path | None) -> str | None:
    """The API key from --api-key / $MESH_INFERENCE_API_KEY or --api-key-file, checked."""
    from mesh_inference.api.security import check_api_key

    if key is not None and key_file is not None:
        raise click.UsageError("give the API key once: --api-key (or $MESH_INFERENCE_API_KEY) "
                               "or --api-key-file")
    hint = "--api-key"
    if key_file is not None:
        hint = "--api-key-file"
        try:
            mode = key_file.stat().st_mode
            key = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {key_file}: {exc}", param_hint=hint) from None
        if mode & 0o077:
            click.echo(f"warning: {key_file} can be read by other users; chmod 600 it", err=True)
    if key is None:
        return None
    try:
        return check_api_key(key.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _limit_malloc_arenas() -> None:
    # glibc gives each thread that allocates its own 64 MiB arena; the sidecar's few
    # worker threads (hashing, file reads) left ~15 MB of idle RSS in them, and a model
    # load's large buffers stayed in the heap (measured idle RSS, 3-node mesh: host 84 ->
    # 67 MB, workers 82 -> 67 MB). Two arenas are plenty for one event loop.
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        # A fixed mmap threshold: glibc otherwise raises it after the first large free,
        # and the 256 KiB tunnel reads of a model load then stay in the heap for good.
        libc.mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD


def _run_loop(coro: Any) -> int:
    """asyncio.run, on uvloop when the ``fast`` extra installed it (MESH_INFERENCE_LOOP=asyncio
    turns it off). The QUIC edge takes time from time.monotonic, not uvloop's ms-tick clock."""
    _limit_malloc_arenas()
    if os.environ.get("MESH_INFERENCE_LOOP", "").strip().lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return int(uvloop.run(coro))
    return int(asyncio.run(coro))


def _fetch_model_if_needed(ref: str, models_dir: Path) -> None:
    """A catalog or hf:// model that is not here yet is downloaded first, with a progress bar."""
    from mesh_inference.cli.models import download_with_progress
    from mesh_inference.models.refs import ModelError, resolve_model

    try:
        resolved = resolve_model(ref, models_dir)
    except ModelError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    if resolved.path is None and resolved.hf is not None:
        click.echo(f"model {ref} is not on this machine: downloading it to {models_dir}", err=True)
        download_with_progress(ref, models_dir)


async def _report_progress(node: Any, *, as_log: bool = False) -> None:
    """Show the mesh coming up: a live line on a terminal, plain lines in a log
    (``as_log``: log records, for ``--log-format json``)."""
    from rich.console import Console

    console = Console(stderr=True)
    progress = logging.getLogger(PROGRESS_LOGGER)
    last = ""
    live = console.is_terminal and not as_log
    status_ctx = console.status("joining the mesh…") if live else None
    if status_ctx is not None:
        status_ctx.start()
    try:
        while True:
            st = node.status()
            plan, engine = st["plan"], st["engine"]
            if st["ready"]:
                line = (f"ready: {st['model']['name']} over {len(plan['order'])} node(s), "
                        f"this node is {st['node']['role']}")
            elif plan["state"] == "waiting":
                line = f"waiting for capacity: {plan['reason']}"
            elif st["host_id"] is None:
                line = f"no plan yet: {plan.get('reason') or 'looking for peers'}"
            else:
                line = f"engine {engine['state']} ({len(plan['order'])} node(s))"
            fetch = _fetch_line(st)
            if fetch:
                line = f"{line}; {fetch}"
            if line != last:
                last = line
                if status_ctx is not None:
                    status_ctx.update(line)
                if as_log:
                    progress.info(line)
                else:
                    console.log(line)
            await asyncio.sleep(0.5)
    finally:
        if status_ctx is not None:
            status_ctx.stop()


def _fetch_line(st: dict[str, Any]) -> str | None:
    """"fetching model X from <peer>: 45%" while this node copies the model file from a peer."""
    fetch = st.get("model_fetch")
    if not fetch or fetch["state"] not in ("fetching", "retrying"):
        return None
    names = {p["id"]: p["name"] for p in st.get("peers", [])}
    peer = names.get(fetch["from"]) or fetch["from"] or "a peer"
    pct = 100 * fetch["bytes"] // fetch["total"] if fetch["total"] else 0
    line = f"fetching model {fetch['ref']} from {peer}: {pct}%"
    return f"{line} (retrying: {fetch['error']})" if fetch["state"] == "retrying" else line


def _node_url(state_dir: Path, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    node_file = state_dir / "node.json"
    try:
        return str(json.loads(node_file.read_text())["http_url"])
    except (OSError, ValueError, KeyError):
        return f"http://127.0.0.1:{DEFAULT_PORT}"


def _get_status(base: str, token: str | None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{base}/api/status", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        data = json.loads(resp.read())
    if not isinstance(data, dict):
        raise ValueError("the status is not a JSON object")
    return data


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@click.option("--url", help="Node API URL (default: from --state-dir's node.json, else :9337).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path.home() / ".mesh-inference",
    show_default=True,
)
def status(as_json: bool, url: str | None, state_dir: Path) -> None:
    """Show a running node's view of the mesh (with its join token when it is ours)."""
    base = _node_url(state_dir, url)
    # The console token proves we are this node's user, so the answer includes the
    # join token. Never sent to an explicit --url: that may be another machine.
    from mesh_inference.machine.state import read_console_token

    token = None if url else read_console_token(state_dir)
    try:
        data = _get_status(base, token)
    except urllib.error.HTTPError as exc:
        if exc.code != 401 or token is None:
            raise click.ClickException(f"{base} answered HTTP {exc.code}") from None
        data = _get_status(base, None)  # a stale token file: the public status still works
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise click.ClickException(f"no node answering at {base}: {exc}") from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from mesh_inference.cli.status_view import render_status

    render_status(data)


def main() -> None:
    cli(auto_envvar_prefix="MESH_INFERENCE")


cli.add_command(models)

if __name__ == "__main__":
    main()
