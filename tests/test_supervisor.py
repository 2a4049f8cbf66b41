"""ProcessSupervisor with real child processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from mesh_inference.engine.supervisor import (
    EngineExited,
    EngineReady,
    EngineRestartScheduled,
    EngineStarting,
    ProcessSupervisor,
    SupervisorEvent,
    parse_health_url,
    probe_http,
    probe_tcp,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
E = TypeVar("E", bound=SupervisorEvent)

# Safety nets so a broken supervisor fails the test instead of hanging it; not assertions.
WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def http_server(port: int, status: int = 200, delay: float = 0.0) -> list[str]:
    return py(f"""
        import http.server, time
        time.sleep({delay})
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response({status})
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
        print("serving", flush=True)
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        await asyncio.sleep(0.02)
    return False


class Events:
    def __init__(self) -> None:
        self.all: list[SupervisorEvent] = []
        self.queue: asyncio.Queue[SupervisorEvent] = asyncio.Queue()

    def __call__(self, event: SupervisorEvent) -> None:
        self.all.append(event)
        self.queue.put_nowait(event)

    async def next(self, kind: type[E]) -> E:
        """The next event of ``kind``, skipping others."""
        async with asyncio.timeout(WAIT_S):
            while True:
                ev = await self.queue.get()
                if isinstance(ev, kind):
                    return ev

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.all if isinstance(e, kind)]


@pytest.fixture
async def sups() -> AsyncIterator[list[ProcessSupervisor]]:
    """Supervisors created by a test; all stopped afterwards whatever happened."""
    created: list[ProcessSupervisor] = []
    yield created
    for s in created:
        await s.stop(timeout=2)


def make(
    sups: list[ProcessSupervisor], tmp_path: Path, events: Events, **kw: Any
) -> ProcessSupervisor:
    sup = ProcessSupervisor(
        f"child{len(sups)}", log_path=tmp_path / f"child{len(sups)}.log", on_event=events, **kw
    )
    sups.append(sup)
    return sup


# ---------------------------------------------------------------- readiness


async def test_http_health_ready_then_stop(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    port = free_port()
    ev = Events()
    sup = make(sups, tmp_path, ev, health_url=f"http://127.0.0.1:{port}/health")
    await sup.start(http_server(port, delay=0.2))
    # Nothing can have answered yet: the child has only just been forked.
    assert str(sup.state) == "starting"
    started = await ev.next(EngineStarting)
    ready = await ev.next(EngineReady)
    assert started.pid == ready.pid == sup.pid
    assert ready.name == sup.name and ready.startup_s > 0
    assert sup.state == "ready"
    assert await probe_http("127.0.0.1", port, "/health")

    pid = sup.pid
    assert pid is not None
    await sup.stop()
    exited = await ev.next(EngineExited)
    assert exited.expected and exited.pid == pid
    assert str(sup.state) == "stopped" and sup.pid is None
    assert sup.returncode == exited.returncode == -signal.SIGTERM
    assert gone(pid)
    assert not ev.of(EngineRestartScheduled)


async def test_http_health_needs_200(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    """A server answering 503 is never ready; startup_timeout kills it as a failure."""
    port = free_port()
    ev = Events()
    sup = make(
        sups,
        tmp_path,
        ev,
        health_url=f"http://127.0.0.1:{port}/",
        startup_timeout=1.5,
        restart_on_crash=False,
    )
    await sup.start(http_server(port, status=503))
    exited = await ev.next(EngineExited)
    assert not exited.expected and exited.returncode == -signal.SIGKILL
    assert not ev.of(EngineReady)
    assert sup.state == "crashed"
    assert "not healthy after" in sup.log_tail()


async def test_tcp_health(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    port = free_port()
    ev = Events()
    sup = make(sups, tmp_path, ev, health_tcp=("127.0.0.1", port))
    await sup.start(
        py(f"""
            import socket, time
            time.sleep(0.2)
            s = socket.socket(); s.bind(("127.0.0.1", {port})); s.listen()
            while True:
                s.accept()[0].close()
        """)
    )
    await ev.next(EngineReady)
    assert sup.state == "ready"


async def test_no_health_check_is_ready_at_once(
    tmp_path: Path, sups: list[ProcessSupervisor]
) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev)
    await sup.start(py("import time; time.sleep(60)"))
    await ev.next(EngineReady)
    assert sup.state == "ready"


# ---------------------------------------------------------------- crashes and restarts


async def test_crash_restarts_with_backoff(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev, backoff_initial=0.05, backoff_max=0.2)
    await sup.start(py("import sys; print('boom on stderr', file=sys.stderr); sys.exit(3)"))
    delays = [(await ev.next(EngineRestartScheduled)).delay_s for _ in range(4)]
    assert delays == [0.05, 0.1, 0.2, 0.2]
    crashes = ev.of(EngineExited)
    assert len(crashes) >= 4
    assert all(not c.expected and c.returncode == 3 for c in crashes)
    assert "boom on stderr" in crashes[0].log_tail
    assert len({s.pid for s in ev.of(EngineStarting)}) >= 4  # a new process each time
    assert sup.returncode == 3

    await sup.stop()
    assert sup.state == "stopped"
    n_starts = len(ev.of(EngineStarting))
    await asyncio.sleep(0.5)  # longer than the largest pending back-off
    assert len(ev.of(EngineStarting)) == n_starts, "stop() must cancel the pending restart"


async def test_backoff_resets_after_healthy_uptime(
    tmp_path: Path, sups: list[ProcessSupervisor]
) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev, backoff_initial=0.05, healthy_reset_after=0.0)
    await sup.start(py("import time, sys; time.sleep(0.05); sys.exit(1)"))
    delays = [(await ev.next(EngineRestartScheduled)).delay_s for _ in range(3)]
    assert delays == [0.05, 0.05, 0.05]


async def test_no_restart_when_disabled(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev, restart_on_crash=False)
    await sup.start(py("import os; os.kill(os.getpid(), 9)"))
    exited = await ev.next(EngineExited)
    assert exited.returncode == -signal.SIGKILL and not exited.expected
    await asyncio.sleep(0.2)
    assert sup.state == "crashed" and sup.pid is None
    assert len(ev.of(EngineStarting)) == 1 and not ev.of(EngineRestartScheduled)


@pytest.mark.parametrize("kill_with_parent", [True, False])
async def test_unexecutable_command_is_an_exit(
    tmp_path: Path, sups: list[ProcessSupervisor], kill_with_parent: bool
) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev, restart_on_crash=False, kill_with_parent=kill_with_parent)
    await sup.start([str(tmp_path / "no-such-binary"), "--flag"])
    exited = await ev.next(EngineExited)
    assert exited.returncode == 127 and not exited.expected
    assert "cannot execute" in exited.log_tail and "no-such-binary" in exited.log_tail
    assert sup.state == "crashed"


async def test_failing_event_handler_does_not_break_supervision(
    tmp_path: Path, sups: list[ProcessSupervisor]
) -> None:
    seen: list[SupervisorEvent] = []

    def handler(event: SupervisorEvent) -> None:
        seen.append(event)
        raise RuntimeError("handler bug")

    sup = ProcessSupervisor(
        "bad-handler", log_path=tmp_path / "x.log", on_event=handler, backoff_initial=0.05
    )
    sups.append(sup)
    await sup.start(py("import sys; sys.exit(1)"))
    async with asyncio.timeout(WAIT_S):
        while sum(isinstance(e, EngineStarting) for e in seen) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_start_again_replaces_the_child(
    tmp_path: Path, sups: list[ProcessSupervisor]
) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev)
    await sup.start(py("import time; time.sleep(60)"))
    first = (await ev.next(EngineReady)).pid
    await sup.start(py("import time; time.sleep(60)"))
    exited = await ev.next(EngineExited)
    assert exited.pid == first and exited.expected
    second = (await ev.next(EngineReady)).pid
    assert second != first and sup.pid == second
    assert gone(first)


# ---------------------------------------------------------------- process groups


GRANDCHILD_PARENT = """
    import signal, subprocess, sys, time
    gc = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    open(sys.argv[1], "w").write(str(gc.pid))
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
"""


async def _start_family(
    sup: ProcessSupervisor, ev: Events, tmp_path: Path, mode: str
) -> tuple[int, int]:
    pidfile = tmp_path / f"grandchild-{mode}.pid"
    await sup.start([*py(GRANDCHILD_PARENT), str(pidfile), mode])
    child = (await ev.next(EngineReady)).pid
    async with asyncio.timeout(WAIT_S):
        while not pidfile.exists() or not pidfile.read_text():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    grandchild = int(pidfile.read_text())
    assert os.getpgid(grandchild) == child, "the grandchild shares the child's process group"
    return child, grandchild


async def test_stop_kills_the_whole_group(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    """The grandchild ignores SIGTERM; it still dies with its group leader."""
    ev = Events()
    sup = make(sups, tmp_path, ev)
    child, grandchild = await _start_family(sup, ev, tmp_path, "default")
    await sup.stop(timeout=5)
    assert (await ev.next(EngineExited)).returncode == -signal.SIGTERM
    assert gone(child)
    assert await wait_gone(grandchild)


async def test_stop_escalates_to_sigkill(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev)
    child, grandchild = await _start_family(sup, ev, tmp_path, "ignore-term")
    await sup.stop(timeout=0.3)
    exited = await ev.next(EngineExited)
    assert exited.expected and exited.returncode == -signal.SIGKILL
    assert gone(child)
    assert await wait_gone(grandchild)


async def test_crashed_leader_takes_its_group_along(
    tmp_path: Path, sups: list[ProcessSupervisor]
) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev, restart_on_crash=False)
    child, grandchild = await _start_family(sup, ev, tmp_path, "default")
    os.kill(child, signal.SIGKILL)
    exited = await ev.next(EngineExited)
    assert not exited.expected and exited.returncode == -signal.SIGKILL
    assert await wait_gone(grandchild)


SIDECAR = """
    import asyncio, sys, time
    from pathlib import Path
    from mesh_inference.engine.supervisor import ProcessSupervisor

    async def main():
        sup = ProcessSupervisor("c", log_path=Path(sys.argv[1]), on_event=lambda e: None)
        await sup.start([sys.executable, "-c", "import time; time.sleep(60)"])
        while sup.state != "ready":
            await asyncio.sleep(0.01)
        print(sup.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
async def test_child_dies_with_a_killed_sidecar(tmp_path: Path) -> None:
    sidecar = await asyncio.create_subprocess_exec(
        *py(SIDECAR),
        str(tmp_path / "c.log"),
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        assert sidecar.stdout is not None
        line = await asyncio.wait_for(sidecar.stdout.readline(), WAIT_S)
        child = int(line)
        assert not gone(child)
        sidecar.kill()  # SIGKILL: the sidecar gets no chance to clean up
        await sidecar.wait()
        assert await wait_gone(child)
    finally:
        if sidecar.returncode is None:
            os.killpg(sidecar.pid, signal.SIGKILL)
            await sidecar.wait()


# ---------------------------------------------------------------- logs


async def test_log_tail_and_appending(tmp_path: Path, sups: list[ProcessSupervisor]) -> None:
    ev = Events()
    sup = make(sups, tmp_path, ev, restart_on_crash=False)
    await sup.start(py("for i in range(1000): print(f'line {i}')"))
    await ev.next(EngineExited)
    assert sup.log_tail(3).splitlines() == ["line 997", "line 998", "line 999"]
    assert sup.log_tail(0) == ""
    await sup.start(py("import sys; print('second run', file=sys.stderr)"))
    exited = await ev.next(EngineExited)
    assert exited.log_tail.splitlines()[-1] == "second run"
    text = sup.log_path.read_text()
    assert "line 0\n" in text and text.count("starting child") == 2


def test_log_tail_without_log(tmp_path: Path) -> None:
    sup = ProcessSupervisor("x", log_path=tmp_path / "none.log", on_event=lambda e: None)
    assert sup.log_tail() == "" and sup.state == "stopped" and sup.pid is None


# ---------------------------------------------------------------- validation and probes


async def test_bad_arguments(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    for url in ("https://127.0.0.1:1/", "127.0.0.1:80", "http:///x", "http://h:99999/"):
        with pytest.raises(ValueError):
            ProcessSupervisor("x", log_path=log, on_event=lambda e: None, health_url=url)
    with pytest.raises(ValueError):
        ProcessSupervisor(
            "x",
            log_path=log,
            on_event=lambda e: None,
            health_url="http://a:1/",
            health_tcp=("a", 1),
        )
    with pytest.raises(ValueError):
        ProcessSupervisor("x", log_path=log, on_event=lambda e: None, health_tcp=("a", 0))
    with pytest.raises(ValueError):
        ProcessSupervisor("x", log_path=log, on_event=lambda e: None, backoff_initial=0)
    sup = ProcessSupervisor("x", log_path=log, on_event=lambda e: None)
    for argv in ([], "python", [PY, 3]):
        with pytest.raises(ValueError):
            await sup.start(argv)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await sup.start([PY], env={"A": 1})  # type: ignore[dict-item]
    assert sup.state == "stopped"


def test_parse_health_url() -> None:
    assert parse_health_url("http://127.0.0.1:8080/health") == ("127.0.0.1", 8080, "/health")
    assert parse_health_url("http://localhost/a?b=1") == ("localhost", 80, "/a?b=1")


async def test_probes_against_real_sockets() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split()[1]
        reply = {
            b"/ok": b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"/busy": b"HTTP/1.1 503 Loading\r\ncontent-length: 0\r\n\r\n",
        }.get(path, b"garbage\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await probe_http("127.0.0.1", port, "/ok")
        assert not await probe_http("127.0.0.1", port, "/busy")
        assert not await probe_http("127.0.0.1", port, "/other")
        assert await probe_tcp("127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()
    closed = free_port()
    assert not await probe_http("127.0.0.1", closed, "/ok")
    assert not await probe_tcp("127.0.0.1", closed)

    # A peer that accepts and never answers must not hang the probe.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        assert not await probe_http("127.0.0.1", silent.getsockname()[1], "/", timeout_s=0.2)
    finally:
        silent.close()


async def test_a_replaced_child_that_ignores_sigterm_gets_only_the_given_grace(
    tmp_path: Path, sups: list[ProcessSupervisor]
) -> None:
    """As a busy llama-server does: the relaunch's stop_timeout, not the default 5 s."""
    ev = Events()
    sup = make(sups, tmp_path, ev)
    flag = tmp_path / "ignoring"
    ignore_term = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "open(sys.argv[1], 'w').close(); time.sleep(60)")
    await sup.start([*py(ignore_term), str(flag)])
    first = (await ev.next(EngineReady)).pid
    async with asyncio.timeout(WAIT_S):
        while not flag.exists():  # noqa: ASYNC110 (the child's handler is in place)
            await asyncio.sleep(0.02)
    await sup.start(py("import time; time.sleep(60)"), stop_timeout=0.2)
    exited = await ev.next(EngineExited)
    assert exited.pid == first and exited.returncode == -signal.SIGKILL
    assert "no exit 0.2 s after SIGTERM" in sup.log_tail()
    assert (await ev.next(EngineReady)).pid != first
