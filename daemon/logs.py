"""The daemon's log output: level, format (plain text or JSON lines) and outputs, from the config
(``log_level``, ``log_format``, ``log_outputs``) or the command line, changed again by a SIGHUP
reload (:func:`configure` may be called any number of times; it replaces the handlers it made).

Plain lines are ``TIME LOGGER LEVEL MESSAGE``.  JSON lines are one object per record:
``{"time": ISO 8601 UTC, "level", "logger", "message"}`` plus the structured fields a log call
passes as ``extra={"fields": {...}}`` (a migration's phase changes and outcome carry
``migration_id``, ``domain``, ``phase``...: :mod:`virtmig.daemon.audit`), and ``exception`` with a
traceback.  Either way every string a virtmig logger interpolates has been escaped
(:mod:`virtmig.proto.logsafe`); JSON escapes the rest.

Outputs: ``stderr`` (what journald collects under systemd) and ``file:/path`` (appended to,
created 0640).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

PLAIN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_MARK = "_virtmig_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: _bounded(v) for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (as logging's last resort)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


FIELD_LIMIT = 1000


def _bounded(value: object) -> object:
    """A field's value, a string cut after :data:`FIELD_LIMIT` characters (JSON escapes the
    rest: no field can forge or flood a line)."""
    if isinstance(value, str) and len(value) > FIELD_LIMIT:
        return f"{value[:FIELD_LIMIT]}...[+{len(value) - FIELD_LIMIT} chars]"
    return value


def _handler(output: str) -> logging.Handler:
    if output == "stderr":
        return _Stderr()
    path = output.removeprefix("file:")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    os.close(fd)
    return logging.FileHandler(path, encoding="utf-8")


def configure(level: str = "info", fmt: str = "plain",
              outputs: Sequence[str] = ("stderr",)) -> None:
    """Route the root logger to ``outputs`` in ``fmt`` at ``level`` (replacing what an earlier
    call set up; handlers others added stay)."""
    root = logging.root  # (the root logger: no module logs through it)
    handlers = [_handler(out) for out in outputs]  # an output that cannot open fails here
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    formatter: logging.Formatter = (JsonFormatter() if fmt == "json"
                                    else logging.Formatter(PLAIN_FORMAT))
    for handler in handlers:
        setattr(handler, _MARK, True)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())


def reset() -> None:
    """Remove the handlers :func:`configure` added (``virtmigd`` run in-process, by tests)."""
    for old in [h for h in logging.root.handlers if getattr(h, _MARK, False)]:
        logging.root.removeHandler(old)
        old.close()
