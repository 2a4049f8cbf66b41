"""``--log-format json``: the formatter, the logging setup, and the real CLI process."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mesh_inference.core.jointoken import JoinToken
from mesh_inference.machine.logs import PROGRESS_LOGGER, JsonFormatter, configure_logging

ROOT = Path(__file__).resolve().parent.parent


def record(msg: str = "hello %s", args: tuple[Any, ...] = ("world",), **extra: Any) -> str:
    rec = logging.LogRecord("mesh_inference.node", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return JsonFormatter().format(rec)


def test_a_line_has_ts_level_logger_and_the_formatted_message() -> None:
    line = record()
    out = json.loads(line)
    assert set(out) == {"ts", "level", "logger", "msg"}
    assert (out["level"], out["logger"], out["msg"]) == ("WARNING", "mesh_inference.node",
                                                         "hello world")
    assert out["ts"].endswith("Z")
    ts = datetime.fromisoformat(out["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert abs(ts - datetime.now(UTC)) < timedelta(seconds=5)


def test_exceptions_extras_and_odd_messages() -> None:
    log = logging.getLogger("test.json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed for %s", "peer\nx", extra={"peer": "ab12", "n": 3,
                                                              "path": Path("/tmp/x"),
                                                              "level": "not the level"})
        log.error("ünïcode \u2028 and \"quotes\"")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # a newline in a message never splits a record
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "failed for peer\nx"
    assert first["level"] == "ERROR"  # an extra field never replaces the record's own
    assert "ValueError: boom" in first["exception"] and "Traceback" in first["exception"]
    assert (first["peer"], first["n"], first["path"]) == ("ab12", 3, "/tmp/x")
    assert second["msg"] == "ünïcode \u2028 and \"quotes\""
    assert "exception" not in second


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    progress_level = logging.getLogger(PROGRESS_LOGGER).level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(PROGRESS_LOGGER).setLevel(progress_level)


@pytest.mark.usefixtures("root_logging")
def test_configure_logging_json_and_text() -> None:
    stream = io.StringIO()
    configure_logging(logging.WARNING, "json", stream)
    logging.getLogger("mesh_inference.x").info("hidden at WARNING")
    logging.getLogger("mesh_inference.x").warning("shown")
    logging.getLogger(PROGRESS_LOGGER).info("progress is always shown")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [rec["msg"] for rec in lines] == ["shown", "progress is always shown"]

    stream = io.StringIO()
    configure_logging(logging.INFO, "text", stream)
    logging.getLogger("mesh_inference.x").info("plain")
    assert stream.getvalue().rstrip().endswith("INFO mesh_inference.x: plain")
    with pytest.raises(ValueError):
        configure_logging(logging.INFO, "xml")  # type: ignore[arg-type]


def test_the_cli_logs_json_lines_while_a_node_runs(tmp_path: Path) -> None:
    """The real CLI runs a client node (port 0, its own state dir) and stops on SIGTERM."""
    token = JoinToken(secrets.token_hex(8), secrets.token_bytes(32), ("127.0.0.1:9",))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "mesh_inference", "--log-format", "json", "-v",
            "--client", "--join", token.encode(), "--http-port", "0", "--quic-port", "0",
            "--quic-host", "127.0.0.1", "--no-mdns", "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        banner = ""
        while "join with" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            banner += line
        assert "join with" in banner, banner
        time.sleep(1.0)  # the progress reporter's first line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every stderr line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= rec.keys() for rec in records)
    progress = [rec["msg"] for rec in records if rec["logger"] == PROGRESS_LOGGER]
    assert any(msg.startswith("no plan yet") for msg in progress), progress
    assert progress[-1] == "stopping"
    # -v: the node's own INFO records come through as JSON too.
    assert any(rec["logger"].startswith("mesh_inference.") and rec["logger"] != PROGRESS_LOGGER
               and rec["level"] == "INFO" for rec in records), records
