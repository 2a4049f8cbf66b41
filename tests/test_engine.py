"""Engine backends: command building and validation; end to end with real llama.cpp on SmolLM2."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from mesh_inference.engine import embedded_rpc, embedded_server
from mesh_inference.engine.backends import (
    BinaryBackend,
    EmbeddedBackend,
    EngineBackend,
    EngineUnavailable,
    find_backend,
    rpc_cache_subdir,
)
from mesh_inference.engine.supervisor import (
    EngineExited,
    EngineReady,
    ProcessSupervisor,
    SupervisorEvent,
)

ROOT = Path(__file__).resolve().parent.parent


def make_exe(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    make_exe(d / "llama-server")
    make_exe(d / "rpc-server")
    return d


@pytest.fixture
def model(tmp_path: Path) -> Path:
    m = tmp_path / "model.gguf"
    m.write_bytes(b"GGUF")
    return m


def server_kwargs(model: Path, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        model=model,
        rpc_endpoints=["127.0.0.1:5001", "127.0.0.1:5002"],
        tensor_split=[0.25, 0.75],
        port=8080,
        ctx_size=4096,
        threads=2,
        alias="smollm2-135m",
    )
    kw.update(over)
    return kw


# ---------------------------------------------------------------- bin backend


def test_bin_from_dir_accepts_old_and_new_rpc_names(bin_dir: Path) -> None:
    b = BinaryBackend.from_dir(bin_dir)
    assert b.rpc_server == (bin_dir / "rpc-server").resolve()
    make_exe(bin_dir / "ggml-rpc-server")
    assert BinaryBackend.from_dir(bin_dir).rpc_server.name == "ggml-rpc-server"


def test_bin_from_dir_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    make_exe(tmp_path / "d" / "llama-server")
    with pytest.raises(EngineUnavailable, match=r"lacks ggml-rpc-server/rpc-server.*pip install"):
        BinaryBackend.from_dir(tmp_path / "d")
    with pytest.raises(EngineUnavailable, match="not a directory"):
        BinaryBackend.from_dir(tmp_path / "nope")
    (tmp_path / "d" / "rpc-server").write_text("not executable")
    with pytest.raises(EngineUnavailable):
        BinaryBackend.from_dir(tmp_path / "d")


def test_bin_rpc_server_command(bin_dir: Path, tmp_path: Path) -> None:
    b = BinaryBackend.from_dir(bin_dir)
    rpc = str((bin_dir / "rpc-server").resolve())
    assert b.rpc_server_command(port=50052, threads=3, cache_dir=None) == [
        rpc, "-H", "127.0.0.1", "-p", "50052", "-t", "3"
    ]  # fmt: skip
    cache = tmp_path / "cache"
    assert b.rpc_server_command(port=50052, threads=1, cache_dir=cache)[-1] == "-c"
    env = b.env(cache)
    # The binary finds its cache through LLAMA_CACHE and keeps the files in <it>/rpc/.
    assert env["LLAMA_CACHE"] == str(cache.resolve())
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(bin_dir.resolve())
    assert "LLAMA_CACHE" not in b.env()
    assert rpc_cache_subdir(cache) == cache / "rpc"


def test_bin_llama_server_command(bin_dir: Path, model: Path) -> None:
    b = BinaryBackend.from_dir(bin_dir)
    argv = b.llama_server_command(**server_kwargs(model))
    assert argv == [
        str((bin_dir / "llama-server").resolve()),
        "-m", str(model.resolve()),
        "--rpc", "127.0.0.1:5001,127.0.0.1:5002",
        "-ngl", "99",
        "-ts", "0.25,0.75",
        "--host", "127.0.0.1",
        "--port", "8080",
        "-c", "4096",
        "-t", "2",
        "--alias", "smollm2-135m",
        "--metrics",
    ]  # fmt: skip
    assert b.health_path == "/health" and b.name == "bin"


# ---------------------------------------------------------------- embedded backend


def test_embedded_commands(model: Path, tmp_path: Path) -> None:
    b = EmbeddedBackend(tmp_path, python="/usr/bin/python3")
    cache = tmp_path / "cache"
    assert b.rpc_server_command(port=7000, threads=2, cache_dir=cache) == [
        "/usr/bin/python3", "-m", "mesh_inference.engine.embedded_rpc",
        "--host", "127.0.0.1", "--port", "7000", "--threads", "2",
        "--cache-dir", str(cache.resolve() / "rpc"),
    ]  # fmt: skip
    assert "--cache-dir" not in b.rpc_server_command(port=7000, threads=2, cache_dir=None)
    assert b.llama_server_command(**server_kwargs(model, tensor_split=[1, 3])) == [
        "/usr/bin/python3", "-m", "mesh_inference.engine.embedded_server",
        "--model", str(model.resolve()),
        "--rpc", "127.0.0.1:5001,127.0.0.1:5002",
        "--tensor-split", "1,3",
        "--host", "127.0.0.1",
        "--port", "8080",
        "--ctx-size", "4096",
        "--threads", "2",
        "--alias", "smollm2-135m",
    ]  # fmt: skip
    env = b.env()
    # Children import mesh_inference even from a source checkout.
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert env["PYTHONUNBUFFERED"] == "1"


# ---------------------------------------------------------------- validation


@pytest.fixture(params=["bin", "embedded"])
def backend(request: pytest.FixtureRequest, bin_dir: Path, tmp_path: Path) -> EngineBackend:
    if request.param == "bin":
        return BinaryBackend.from_dir(bin_dir)
    return EmbeddedBackend(tmp_path)


BAD_ENDPOINTS = [
    "0.0.0.0:5001", "localhost:5001", "10.0.0.2:5001", "[::1]:5001", "127.0.0.1",
    "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:abc", "127.0.0.1:+1",
    "127.0.0.1:١٢", " 127.0.0.1:5001", "",
]  # fmt: skip


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_endpoints_must_be_loopback_ports(
    backend: EngineBackend, model: Path, endpoint: str
) -> None:
    with pytest.raises(ValueError):
        backend.llama_server_command(
            **server_kwargs(model, rpc_endpoints=["127.0.0.1:5001", endpoint])
        )


@pytest.mark.parametrize(
    "over",
    [
        {"rpc_endpoints": []},
        {"rpc_endpoints": "127.0.0.1:5001"},
        {"rpc_endpoints": ["127.0.0.1:5001", "127.0.0.1:5001"]},
        {"rpc_endpoints": [f"127.0.0.1:{5000 + i}" for i in range(17)]},
        {"tensor_split": [1.0]},
        {"tensor_split": [0.5, 0.3, 0.2]},
        {"tensor_split": [0.0, 0.0]},
        {"tensor_split": [-0.5, 1.5]},
        {"tensor_split": [float("nan"), 1.0]},
        {"tensor_split": [float("inf"), 1.0]},
        {"tensor_split": [True, 1.0]},
        {"tensor_split": ["0.5", "0.5"]},
        {"tensor_split": "0.5,0.5"},
        {"port": 0},
        {"port": 65536},
        {"port": True},
        {"port": "8080"},
        {"ctx_size": -1},
        {"threads": 0},
        {"threads": 2000},
        {"alias": ""},
        {"alias": "a,b"},
        {"alias": "-x"},
        {"alias": "two words"},
        {"alias": "nl\n"},
        {"alias": "x" * 201},
    ],
)
def test_llama_server_command_rejects(
    backend: EngineBackend, model: Path, over: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        backend.llama_server_command(**server_kwargs(model, **over))


def test_missing_model_rejected(backend: EngineBackend, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model file not found"):
        backend.llama_server_command(**server_kwargs(tmp_path / "absent.gguf"))


def test_zero_share_and_ctx_zero_allowed(backend: EngineBackend, model: Path) -> None:
    argv = backend.llama_server_command(
        **server_kwargs(model, tensor_split=[0, 1], ctx_size=0, alias="hf://org/repo:Q4")
    )
    assert "0,1" in argv and "hf://org/repo:Q4" in argv


@pytest.mark.parametrize(
    "kw", [{"port": 0}, {"port": 70000}, {"threads": 0}, {"threads": -1}, {"port": False}]
)
def test_rpc_server_command_rejects(backend: EngineBackend, kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"port": 50052, "threads": 1, "cache_dir": None, **kw}
    with pytest.raises(ValueError):
        backend.rpc_server_command(**args)


def test_cache_dir_must_be_a_directory(backend: EngineBackend, model: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        backend.rpc_server_command(port=50052, threads=1, cache_dir=model)


# ---------------------------------------------------------------- find_backend


def test_find_backend_names(bin_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        find_backend("gpu")
    b = find_backend("bin", bin_dir)
    assert isinstance(b, BinaryBackend) and b.llama_server.parent == bin_dir.resolve()
    # An explicit --llama-bin is honoured by "auto" too, and never silently replaced.
    assert isinstance(find_backend("auto", bin_dir), BinaryBackend)
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("bin", "auto"):
        with pytest.raises(EngineUnavailable, match="lacks llama-server"):
            find_backend(name, empty)
    with pytest.raises(EngineUnavailable, match="only applies to the bin engine"):
        find_backend("embedded", bin_dir)


def test_find_backend_auto_returns_something_or_says_why() -> None:
    try:
        b = find_backend("auto")
    except EngineUnavailable as exc:
        assert "bin:" in str(exc) and "embedded:" in str(exc)
    else:
        assert b.name in ("bin", "embedded")


# ---------------------------------------------------------------- embedded entry points


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "5000", "--host", "0.0.0.0"],
        ["--port", "0"],
        ["--port", "5000", "--threads", "0"],
        ["--port", "x"],
        [],
    ],
)
def test_embedded_rpc_bad_args(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        embedded_rpc.main(argv)
    assert exc.value.code == 2
    assert "embedded_rpc" in capsys.readouterr().err


def test_embedded_rpc_missing_libs(tmp_path: Path) -> None:
    with pytest.raises(embedded_rpc.GgmlError, match="GGML_RPC=ON"):
        embedded_rpc.load_ggml(tmp_path)


@pytest.mark.parametrize(
    "extra",
    [
        ["--rpc", "10.0.0.1:5000", "--tensor-split", "1"],
        ["--rpc", "127.0.0.1:5000", "--tensor-split", "0.5,0.5"],
        ["--rpc", "127.0.0.1:5000", "--tensor-split", "a"],
        ["--rpc", "127.0.0.1:5000", "--tensor-split", "1", "--host", "0.0.0.0"],
        ["--rpc", "127.0.0.1:5000", "--tensor-split", "1", "--alias", "a,b"],
    ],
)
def test_embedded_server_bad_args(
    model: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        embedded_server.main(["--model", str(model), "--port", "8080", *extra])
    assert exc.value.code == 2
    assert "embedded_server" in capsys.readouterr().err


def test_embedded_server_missing_model(tmp_path: Path) -> None:
    argv = ["--model", str(tmp_path / "x.gguf"), "--port", "1", "--rpc", "127.0.0.1:2"]
    with pytest.raises(SystemExit) as exc:
        embedded_server.main([*argv, "--tensor-split", "1"])
    assert exc.value.code == 2


# ---------------------------------------------------------------- end to end

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def installed(name: str) -> EngineBackend:
    try:
        return find_backend(name)
    except EngineUnavailable as exc:
        pytest.skip(f"{name} engine not installed: {exc}")


async def wait_for(sup: ProcessSupervisor, events: list[SupervisorEvent]) -> None:
    """Until ``sup`` is ready; fails with its log if it exits first."""
    async with asyncio.timeout(300):
        while sup.state != "ready":
            died = [e for e in events if isinstance(e, EngineExited) and e.name == sup.name]
            if died:
                pytest.fail(f"{sup.name} exited with {died[0].returncode}:\n{died[0].log_tail}")
            await asyncio.sleep(0.05)


def listening_addresses(pid: int) -> set[str]:
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


async def chat(session: aiohttp.ClientSession, base: str, **extra: Any) -> str:
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 16, **extra}
    async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        if not extra.get("stream"):
            data = await resp.json()
            return str(data["choices"][0]["message"]["content"])
        assert resp.headers["content-type"].startswith("text/event-stream")
        pieces: list[str] = []
        done = False
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                done = True
                break
            delta = json.loads(payload)["choices"][0].get("delta", {})
            pieces.append(delta.get("content") or "")
        assert done, "stream ended without [DONE]"
        assert len([p for p in pieces if p]) > 1, "expected the answer in several chunks"
        return "".join(pieces)


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["bin", "embedded"])
async def test_two_rpc_servers_and_a_server_answer_paris(
    engine: str, smollm2_path: Path, tmp_path: Path
) -> None:
    backend = installed(engine)
    events: list[SupervisorEvent] = []
    sups: list[ProcessSupervisor] = []

    def supervisor(name: str, **kw: Any) -> ProcessSupervisor:
        s = ProcessSupervisor(
            name, log_path=tmp_path / f"{name}.log", on_event=events.append,
            restart_on_crash=False, **kw,
        )  # fmt: skip
        sups.append(s)
        return s

    try:
        ports = [free_port(), free_port()]
        for i, port in enumerate(ports):
            cache = tmp_path / f"cache{i}"
            rpc = supervisor(f"rpc{i}", health_tcp=("127.0.0.1", port))
            argv = backend.rpc_server_command(port=port, threads=1, cache_dir=cache)
            await rpc.start(argv, backend.env(cache))
        for rpc in sups:
            await wait_for(rpc, events)
            assert rpc.pid is not None
            # No auth on the RPC protocol: it must never listen beyond loopback.
            assert listening_addresses(rpc.pid) == {"127.0.0.1"}

        rss_before = [psutil.Process(r.pid).memory_info().rss for r in sups if r.pid]
        http = free_port()
        server = supervisor("server", health_url=f"http://127.0.0.1:{http}{backend.health_path}")
        argv = backend.llama_server_command(
            model=smollm2_path,
            rpc_endpoints=[f"127.0.0.1:{p}" for p in ports],
            tensor_split=[0.5, 0.5],
            port=http,
            ctx_size=2048,
            threads=1,
            alias="smollm2",
        )
        await server.start(argv, backend.env())
        await wait_for(server, events)
        assert any(isinstance(e, EngineReady) and e.name == "server" for e in events)
        # Layers really landed on both RPC devices: each now holds megabytes of weights.
        for rpc, before in zip(sups[:2], rss_before, strict=True):
            assert rpc.pid is not None
            grown = psutil.Process(rpc.pid).memory_info().rss - before
            assert grown > 10 << 20, f"{rpc.name} grew by only {grown} bytes"

        base = f"http://127.0.0.1:{http}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            async with session.get(f"{base}/v1/models") as resp:
                assert resp.status == 200
                ids = [m["id"] for m in (await resp.json())["data"]]
                assert "smollm2" in ids
            assert "Paris" in await chat(session, base)
            assert "Paris" in await chat(session, base, stream=True)
        assert not [e for e in events if isinstance(e, EngineExited)]
        # The output weights (> 10 MiB) sit on the last device, whose cache kept them.
        assert any(rpc_cache_subdir(tmp_path / "cache1").iterdir())
    finally:
        for s in reversed(sups):
            await s.stop()
    pids = [e.pid for e in events if isinstance(e, EngineExited)]
    assert len(pids) == 3 and all(not psutil.pid_exists(p) or _zombie(p) for p in pids)


def _zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def test_worker_rpc_server_keeps_no_weight_cache(tmp_path: Path) -> None:
    """No -c: weights come by reference from the node's own GGUF; an old cache dir goes."""
    from mesh_inference.engine.backends import EngineUnavailable, find_backend
    from mesh_inference.engine.worker import WorkerService

    try:
        backend = find_backend("bin")
    except EngineUnavailable as exc:
        pytest.skip(f"llama.cpp binaries not installed: {exc}")
    stale = tmp_path / "rpc-cache" / "rpc"
    stale.mkdir(parents=True)
    (stale / "0123456789abcdef").write_bytes(b"x" * 1024)  # a tensor an older version kept
    worker = WorkerService(backend, state_dir=tmp_path, threads=1, on_change=lambda: None)
    await worker.start()
    try:
        async with asyncio.timeout(60):
            while not worker.ready:  # noqa: ASYNC110 (state the service owns)
                await asyncio.sleep(0.05)
        me = psutil.Process()
        (rpc,) = [c for c in me.children(recursive=True) if "rpc" in c.name()]
        assert "-c" not in rpc.cmdline()[1:]
        assert "LLAMA_CACHE" not in rpc.environ()
        assert not (tmp_path / "rpc-cache").exists()
    finally:
        await worker.stop()
