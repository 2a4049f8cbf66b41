"""Start several real nodes on one machine (loopback): for the demo, tests and benchmarks.

Each node is a real ``python -m mesh_inference`` process in its own process
group with its own state dir; ``stop()`` ends exactly those groups.
``NodeProcess.console_url`` logs a browser in (it carries the node's console
token); ``status()`` and ``request()`` send that token, so they see what the
node's own user sees (the join token, the model routes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_inference.machine.state import read_console_token


@dataclass
class NodeProcess:
    name: str
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    http_port: int = 0
    netns: str | None = None  # runs inside this network namespace
    console_token: str = ""  # read from <state-dir>/console-token once the node started
    start_args: dict[str, Any] = field(default_factory=dict)  # start_node's keywords (restart)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def console_url(self) -> str:
        """The URL that logs a browser in to this node's console (as the CLI prints it)."""
        return f"{self.url}/?token={self.console_token}"

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.console_token}"} if self.console_token else {}

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        """``/api/status`` as the node's user sees it (with the join token)."""
        if self.netns is not None:
            return json.loads(self.http_in_netns("GET", "/api/status", None, timeout))  # type: ignore[no-any-return]
        req = urllib.request.Request(f"{self.url}/api/status", headers=self.auth_headers())
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def request(
        self, method: str, path: str, body: object = None, timeout: float = 60.0
    ) -> tuple[int, Any]:
        """A JSON request with the console token: (HTTP status, decoded JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"content-type": "application/json", **self.auth_headers()},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def http_in_netns(self, method: str, path: str, body: bytes | None, timeout: float) -> str:
        """An HTTP request made from inside the node's network namespace (with the token)."""
        assert self.netns is not None
        code = (
            "import json, sys, urllib.request\n"
            "req = urllib.request.Request(sys.argv[1], data=sys.stdin.buffer.read() or None,"
            " method=sys.argv[2], headers=json.loads(sys.argv[4]))\n"
            "sys.stdout.write(urllib.request.urlopen(req, timeout=float(sys.argv[3])).read()"
            ".decode())\n"
        )
        headers = {"content-type": "application/json", **self.auth_headers()}
        out = subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", code, self.url + path,
             method, str(timeout), json.dumps(headers)],
            input=body or b"", capture_output=True, timeout=timeout + 10,
        )
        if out.returncode != 0:
            raise OSError(out.stderr.decode(errors="replace")[-500:])
        return out.stdout.decode()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the node's whole process group (sidecar + its engine children)."""
        if self.proc.poll() is None or sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class LocalMesh:
    root: Path
    python: str = sys.executable
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    nodes: list[NodeProcess] = field(default_factory=list)

    def start_node(
        self,
        name: str,
        *,
        model: str | None = None,
        join: str | None = None,
        client: bool = False,
        max_vram_gb: float | None = None,
        http_port: int = 0,
        args: list[str] | None = None,
        netns: str | None = None,
        quic_host: str = "127.0.0.1",
    ) -> NodeProcess:
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        (state / "node.json").unlink(missing_ok=True)
        argv = [
            self.python,
            "-m",
            "mesh_inference",
            "--state-dir",
            str(state),
            "--http-port",
            str(http_port),
            "--quic-port",
            "0",
            "--quic-host",
            quic_host,
            "--no-mdns",
            "--name",
            name,
            "-v",
            *self.extra_args,
            *(args or []),
        ]
        if model:
            argv += ["--model", model]
        if join:
            argv += ["--join", join]
        if client:
            argv.append("--client")
        if max_vram_gb is not None:
            argv += ["--max-vram", str(max_vram_gb)]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        log_path = state / "node.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        log.close()
        node = NodeProcess(name, state, proc, log_path, netns=netns, start_args=dict(
            model=model, join=join, client=client, max_vram_gb=max_vram_gb,
            http_port=http_port, args=args, netns=netns, quic_host=quic_host,
        ))  # fmt: skip
        self.nodes.append(node)
        self._wait_node_file(node)
        return node

    def _wait_node_file(self, node: NodeProcess, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        path = node.state_dir / "node.json"
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"node {node.name} exited ({node.proc.returncode}):\n{node.log_tail()}"
                )
            try:
                node.http_port = int(json.loads(path.read_text())["http_url"].rsplit(":", 1)[1])
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
                continue
            # node.json is written last in start(): the token file exists by now.
            token = read_console_token(node.state_dir)
            if token is None:
                raise RuntimeError(f"node {node.name} started without a console token in "
                                   f"{node.state_dir}:\n{node.log_tail()}")
            node.console_token = token
            return
        raise TimeoutError(f"node {node.name} did not start:\n{node.log_tail()}")

    def restart_node(self, node: NodeProcess, *, join: str | None = None) -> NodeProcess:
        """Start ``node`` again after it exited: same name, state dir (so the same node id)
        and options; ``join`` replaces its join token (a survivor's: ports are ephemeral)."""
        if node.proc.poll() is None:
            raise RuntimeError(f"node {node.name} is still running (pid {node.proc.pid})")
        if node in self.nodes:  # its process was reaped: never signal that pid again
            self.nodes.remove(node)
        kwargs = dict(node.start_args)
        if join is not None:
            kwargs["join"] = join
        return self.start_node(node.name, **kwargs)

    def join_token(self, node: NodeProcess) -> str:
        return (node.state_dir / "join-token").read_text().strip()

    def wait_for(
        self, node: NodeProcess, predicate: Any, timeout: float = 120.0, what: str = "condition"
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.name} exited:\n{node.log_tail()}")
            try:
                last = node.status()
                if predicate(last):
                    return last
            except (urllib.error.URLError, OSError, ValueError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"{what} not reached on {node.name}; last status: "
            f"{json.dumps(last)[:2000]}\n{node.log_tail()}"
        )

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                try:
                    os.killpg(node.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=15)
            # The group may hold engine children even after the sidecar exited.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            if node.proc.poll() is None:
                node.proc.wait()
        self.nodes.clear()
