"""Logging setup: one file per process kind, cid and service on every line, JSON optional."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from esb.observe.context import ContextFilter

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
