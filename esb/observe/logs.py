"""Logging setup: one file per process kind, cid and service on every line, JSON optional."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

from esb.observe.context import ContextFilter

# A failed request logs at most this much traceback: the innermost frames, where the error
# is, and no more characters than a screen or two, so no request can flood the log.
TRACEBACK_FRAMES = 16
TRACEBACK_CHARS = 6000

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s cid=%(cid)s service=%(service)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the structured fields esb sets in ``extra``."""

    FIELDS = ("cid", "service", "channel", "outconn", "job", "worker_pid")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value not in (None, "-"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def file_handler(log_file: Path, *, as_json: bool = False) -> logging.Handler:
    """A handler appending esb's log lines to LOG_FILE, for a logger of one part of a
    process that logs elsewhere (the launcher's pickup thread writes to server.log)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    return handler


def setup_logging(log_file: Path | None, *, level: str = "INFO", as_json: bool = False) -> None:
    """Send the ``esb`` loggers (and gunicorn's) to LOG_FILE, or stderr when None."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Drivers are chatty at DEBUG; keep them at WARNING unless asked otherwise.
    for noisy in ("kombu", "amqp", "apscheduler.scheduler", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def bounded_traceback(exc: BaseException) -> str:
    """EXC's traceback, innermost TRACEBACK_FRAMES frames of each chained exception, cut to
    TRACEBACK_CHARS around the middle (the head says where, the tail what was raised)."""
    text = "".join(
        traceback.TracebackException(type(exc), exc, exc.__traceback__, limit=-TRACEBACK_FRAMES).format()
    )
    if len(text) > TRACEBACK_CHARS:
        half = TRACEBACK_CHARS // 2
        text = f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"
    return text.rstrip("\n")
