"""How the node's log lines look: ``--log-format text`` (default) or ``json``.

Public API::

    configure_logging(level, "text" | "json", stream=sys.stderr)
    JsonFormatter()          # one JSON object per line
    PROGRESS_LOGGER          # the CLI's progress lines, as log records in JSON mode

A JSON line holds ``ts`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
``msg`` (the formatted message), ``exception`` (the traceback text) and
``stack`` when present, and every field passed with ``extra=`` (values that
are not JSON become their ``str``). Extra fields never replace those keys.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_LOGGER = "mesh_inference.progress"

# Attributes every LogRecord has; whatever else is on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}  # fmt: skip


def _timestamp(created: float) -> str:
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out.setdefault(key, value)
        # ensure_ascii: a line stays one line and valid UTF-8 whatever the message holds.
        return json.dumps(out, default=str)


def configure_logging(
    level: int, fmt: LogFormat = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Replace the root logger's handlers with one writing ``fmt`` lines to ``stream``.

    In JSON mode the CLI's progress lines are log records too (INFO on
    :data:`PROGRESS_LOGGER`, shown at every verbosity, as the text ones are).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: expected text or json")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if fmt == "json":
        logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)
    return handler
