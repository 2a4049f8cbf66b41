"""Run one engine process as a supervised child: its death is an event, never our crash.

Public API::

    ProcessSupervisor(name, *, log_path, health_url=None, health_tcp=None, on_event,
                      backoff_initial=0.5, backoff_max=30.0, healthy_reset_after=30.0,
                      restart_on_crash=True, startup_timeout=None, health_interval=0.2,
                      kill_with_parent=True)
        async start(argv, env=None)   # stops a running child first; env = extra variables
        async stop(timeout=5.0)       # SIGTERM to the process group, SIGKILL after timeout
        state: "stopped" | "starting" | "ready" | "crashed" | "backoff"
        pid: int | None               # the running child, if any
        returncode: int | None        # of the last child that exited
        argv: list[str] | None
        log_tail(n_lines=40) -> str

    Events (frozen dataclasses, passed to on_event on the event loop):
        EngineStarting(name, pid)
        EngineReady(name, pid, startup_s)
        EngineExited(name, pid, returncode, expected, log_tail)
        EngineRestartScheduled(name, delay_s)
    SupervisorEvent = the union of the four

The child runs in a new session (its own process group), with stdout and
stderr appended to ``log_path``. It is *ready* when ``health_url`` (plain
``http://``) answers 200, or ``health_tcp`` accepts a connection, or at once
when neither is given. An exit nobody asked for is reported with
``expected=False`` and, with ``restart_on_crash``, followed by a restart
after an exponential back-off that resets once a child has stayed ready for
``healthy_reset_after`` seconds. When the group leader exits, whatever is
left of its group is killed, so no grandchild outlives it. On Linux the child
also gets ``PR_SET_PDEATHSIG``: if the sidecar dies (even by SIGKILL) its
engines die with it instead of holding ports and CPUs. That signal follows the
*thread* that forked, here the event loop's (the main thread in the CLI): a
supervisor driven by a loop on another thread loses its children with that
thread. Elsewhere there is no such signal (see DESIGN.md, Leaving).

Nothing the child does raises into the caller: a command that cannot be
executed is an exit with code 127 and the reason in the log. Waiting for
exits uses a pidfd on the event loop (a thread where pidfds are missing), so
the loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SupervisorState = Literal["stopped", "starting", "ready", "crashed", "backoff"]

PROBE_TIMEOUT_S = 2.0
KILL_WAIT_S = 10.0


@dataclass(frozen=True)
class EngineStarting:
    name: str
    pid: int


@dataclass(frozen=True)
class EngineReady:
    name: str
    pid: int
    startup_s: float


@dataclass(frozen=True)
class EngineExited:
    name: str
    pid: int
    returncode: int
    expected: bool
    log_tail: str


@dataclass(frozen=True)
class EngineRestartScheduled:
    name: str
    delay_s: float


SupervisorEvent = EngineStarting | EngineReady | EngineExited | EngineRestartScheduled

# Runs in the child before the real program replaces it (exec keeps the pid and the
# death signal). Checking the parent after prctl closes the race where the sidecar
# died before the signal was armed.
_PDEATHSIG_STUB = """\
import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    sys.stderr.write(f"cannot execute {sys.argv[2]}: {exc}\\n")
    os._exit(127)
"""


@dataclass
class _Child:
    proc: subprocess.Popen[bytes] | None
    pid: int
    started: float
    exited: asyncio.Future[int]
    ready_at: float | None = None
    reaper: asyncio.Task[None] | None = field(default=None, repr=False)


def parse_health_url(url: str) -> tuple[str, int, str]:
    """(host, port, request target) of a plain-HTTP health URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"health_url must be http://host:port/path, got {url!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"health_url has a bad port: {url!r}") from exc
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if any(c in target for c in "\r\n "):
        raise ValueError(f"health_url has a bad path: {url!r}")
    return parts.hostname, port, target


async def probe_http(host: str, port: int, target: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if ``GET target`` answers with status 200."""
    writer: asyncio.StreamWriter | None = None
    request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request.encode())
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            await _close(writer)
    parts = line.split()
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"200"


async def probe_tcp(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if something accepts a TCP connection on host:port."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    await _close(writer)
    return True


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


class ProcessSupervisor:
    """Starts, watches, restarts and stops one child process (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        log_path: Path,
        health_url: str | None = None,
        health_tcp: tuple[str, int] | None = None,
        on_event: Callable[[SupervisorEvent], None],
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        healthy_reset_after: float = 30.0,
        restart_on_crash: bool = True,
        startup_timeout: float | None = None,
        health_interval: float = 0.2,
        kill_with_parent: bool = True,
    ) -> None:
        if health_url is not None and health_tcp is not None:
            raise ValueError("give health_url or health_tcp, not both")
        self._health_http = parse_health_url(health_url) if health_url is not None else None
        if health_tcp is not None:
            host, port = health_tcp
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ValueError(f"health_tcp port must be in 1..65535, got {port!r}")
            self._health_tcp: tuple[str, int] | None = (str(host), port)
        else:
            self._health_tcp = None
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if healthy_reset_after < 0 or health_interval <= 0:
            raise ValueError("healthy_reset_after must be >= 0 and health_interval > 0")
        if startup_timeout is not None and startup_timeout <= 0:
            raise ValueError("startup_timeout must be > 0")
        self.name = name
        self.log_path = Path(log_path)
        self._on_event = on_event
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._healthy_reset_after = healthy_reset_after
        self._restart_on_crash = restart_on_crash
        self._startup_timeout = startup_timeout
        self._health_interval = health_interval
        self._kill_with_parent = kill_with_parent and sys.platform.startswith("linux")
        self._state: SupervisorState = "stopped"
        self._argv: list[str] | None = None
        self._env: dict[str, str] = {}
        self._child: _Child | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._returncode: int | None = None
        self._delay = backoff_initial
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ public

    @property
    def state(self) -> SupervisorState:
        return self._state

    @property
    def pid(self) -> int | None:
        child = self._child
        if child is None or child.exited.done():
            return None
        return child.pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def argv(self) -> list[str] | None:
        return list(self._argv) if self._argv is not None else None

    async def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stop_timeout: float = 5.0,
    ) -> None:
        """Run ``argv`` (stopping the current child first); returns once it is spawned.

        ``env`` holds extra variables laid over this process's environment;
        ``stop_timeout``: how long the current child gets after SIGTERM.
        """
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty sequence of strings")
        if env is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError("env must map strings to strings")
        async with self._lock:
            await self._stop_locked(stop_timeout)
            self._argv = list(argv)
            self._env = dict(env or {})
            self._delay = self._backoff_initial
            self._returncode = None
            self._child = self._spawn()
            self._run_task = asyncio.get_running_loop().create_task(
                self._run(self._child), name=f"supervise {self.name}"
            )

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """End the child's whole process group and cancel any pending restart."""
        async with self._lock:
            await self._stop_locked(timeout)

    def log_tail(self, n_lines: int = 40) -> str:
        """The last ``n_lines`` lines of the log (every start appends to it)."""
        if n_lines <= 0:
            return ""
        want = max(8192, n_lines * 512)
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - want))
                data = fh.read()
        except OSError:
            return ""
        lines = data.decode("utf-8", errors="replace").splitlines()
        if len(data) == want and size > want:
            lines = lines[1:]  # the first line was cut by the seek
        return "\n".join(lines[-n_lines:])

    # ------------------------------------------------------------ internals

    def _emit(self, event: SupervisorEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("%s: on_event handler failed for %s", self.name, event)

    def _set_state(self, state: SupervisorState) -> None:
        self._state = state

    def _write_log(self, text: str) -> None:
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as fh:
                fh.write(text.encode("utf-8", errors="replace"))
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.name, self.log_path, exc)

    def _spawn(self) -> _Child:
        """Fork/exec the child synchronously so no await can split it from its bookkeeping."""
        assert self._argv is not None
        loop = asyncio.get_running_loop()
        argv = self._argv
        if self._kill_with_parent:
            argv = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_STUB, str(os.getpid()), *argv]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write_log(f"\n--- {stamp} starting {self.name}: {shlex.join(self._argv)}\n")
        exited: asyncio.Future[int] = loop.create_future()
        proc: subprocess.Popen[bytes] | None = None
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as out:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self._env},
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            self._write_log(f"cannot execute {self._argv[0]}: {exc}\n")
            exited.set_result(127)
        child = _Child(proc, proc.pid if proc else 0, loop.time(), exited)
        if proc is not None:
            child.reaper = loop.create_task(self._reap(child), name=f"reap {self.name}")
            self._set_state("starting")
            self._emit(EngineStarting(self.name, child.pid))
        return child

    async def _reap(self, child: _Child) -> None:
        proc = child.proc
        assert proc is not None
        loop = asyncio.get_running_loop()
        rc: int
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        try:
            if pidfd is None:
                rc = await loop.run_in_executor(None, proc.wait)
                self._kill_group(child, signal.SIGKILL)
            else:
                gone: asyncio.Future[None] = loop.create_future()

                def readable() -> None:
                    if not gone.done():
                        gone.set_result(None)

                loop.add_reader(pidfd, readable)
                try:
                    await gone
                finally:
                    loop.remove_reader(pidfd)
                    os.close(pidfd)
                # The leader is a zombie until reaped, so its group id cannot have been
                # reused: killing stragglers here cannot hit an unrelated process.
                self._kill_group(child, signal.SIGKILL)
                rc = proc.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: waiting for pid %d failed", self.name, child.pid)
            polled = proc.poll()
            rc = polled if polled is not None else -1
        if not child.exited.done():
            child.exited.set_result(rc)

    def _kill_group(self, child: _Child, sig: signal.Signals) -> None:
        if child.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    async def _wait_healthy(self) -> None:
        while True:
            if self._health_http is not None:
                if await probe_http(*self._health_http):
                    return
            elif self._health_tcp is not None and await probe_tcp(*self._health_tcp):
                return
            await asyncio.sleep(self._health_interval)

    async def _run(self, child: _Child) -> None:
        """One start(): watch the child, restart it after crashes until stop() cancels us."""
        try:
            while True:
                rc = await self._watch(child)
                self._returncode = rc
                loop = asyncio.get_running_loop()
                if (
                    child.ready_at is not None
                    and loop.time() - child.ready_at >= self._healthy_reset_after
                ):
                    self._delay = self._backoff_initial
                self._set_state("crashed")
                self._emit(EngineExited(self.name, child.pid, rc, False, self.log_tail()))
                if not self._restart_on_crash:
                    return
                delay = self._delay
                self._delay = min(self._delay * 2, self._backoff_max)
                self._set_state("backoff")
                self._emit(EngineRestartScheduled(self.name, delay))
                await asyncio.sleep(delay)
                child = self._child = self._spawn()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: supervisor failed", self.name)
            self._set_state("crashed")

    async def _watch(self, child: _Child) -> int:
        """Wait for readiness (emitting EngineReady), then for the exit code."""
        if child.exited.done():
            return child.exited.result()
        if self._health_http is None and self._health_tcp is None:
            self._mark_ready(child)
        else:
            health = asyncio.get_running_loop().create_task(self._wait_healthy())
            waiting: set[asyncio.Future[Any]] = {health, child.exited}
            try:
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=self._startup_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                health.cancel()
            if child.exited.done():
                pass
            elif health in done:
                self._mark_ready(child)
            else:
                self._write_log(f"--- not healthy after {self._startup_timeout} s: killing\n")
                self._kill_group(child, signal.SIGKILL)
        # wait() rather than await: cancelling us must not cancel the shared future.
        await asyncio.wait({child.exited})
        return child.exited.result()

    def _mark_ready(self, child: _Child) -> None:
        now = asyncio.get_running_loop().time()
        child.ready_at = now
        self._set_state("ready")
        self._emit(EngineReady(self.name, child.pid, now - child.started))

    async def _stop_locked(self, timeout_s: float) -> None:
        run, self._run_task = self._run_task, None
        if run is not None and not run.done():
            run.cancel()
            await asyncio.wait({run})
        child, self._child = self._child, None
        if child is not None and child.proc is not None and not child.exited.done():
            self._kill_group(child, signal.SIGTERM)
            done, _ = await asyncio.wait({child.exited}, timeout=max(0.0, timeout_s))
            if not done:
                self._write_log(f"--- no exit {timeout_s} s after SIGTERM: SIGKILL\n")
                self._kill_group(child, signal.SIGKILL)
                done, _ = await asyncio.wait({child.exited}, timeout=KILL_WAIT_S)
            self._set_state("stopped")
            if done:
                rc = child.exited.result()
                self._returncode = rc
                self._emit(EngineExited(self.name, child.pid, rc, True, self.log_tail()))
            else:
                log.error("%s: pid %d survived SIGKILL for %s s", self.name, child.pid, KILL_WAIT_S)
        self._set_state("stopped")
