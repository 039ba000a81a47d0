"""Logging setup: one file per process kind, cid and service on every line, JSON optional.

A log line is one record, and no value from outside (a request path, a header, an AMQP
property, a payload quoted in an exception) can end it and begin another: ``OneLineValues``,
on every handler esb sets up, escapes the control characters of each value a record
formats (``escape_controls``), and tracebacks come with their exceptions' messages
escaped the same way (``bounded_traceback``). Only the lines of a traceback break a record.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from esb.observe.context import ContextFilter

# A failed request logs at most this much traceback: the innermost frames, where the error
# is, and no more characters than a screen or two, so no request can flood the log.
TRACEBACK_FRAMES = 16
TRACEBACK_CHARS = 6000

# What may end a line for some reader: C0 controls but tab, DEL, C1 controls and the
# Unicode line and paragraph separators (str.splitlines breaks at each of them).
_CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def escape_controls(text: str) -> str:
    """TEXT with every control character written as an escape (``\\n``, ``\\r``,
    ``\\x1b``, ``\\u2028``): what it holds shows, and it stays on one line."""
    if not _CONTROLS.search(text):
        return text
    return _CONTROLS.sub(lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode()), text)


class Traceback(str):
    """Text of many lines that esb made itself, with every outside value in it escaped:
    left as it is by ``OneLineValues``."""


def _one_line(value: Any) -> Any:
    if value is None or isinstance(value, Traceback | int | float):
        return value
    text = str(value)
    return escape_controls(text) if _CONTROLS.search(text) else value


# Fields a record carries beside its message (``extra``), as the formatters print them.
_STAMPED = ("cid", "service", "channel", "outconn", "job", "worker_pid")


class OneLineValues(logging.Filter):
    """Escapes the control characters of every value a record formats, so none can end
    the record's line (and a log reader take what follows for a record of its own).

    Idempotent: a record that passes several handlers is escaped once in effect.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            record.msg = escape_controls(str(record.msg))
        args = record.args
        if isinstance(args, Mapping):
            record.args = {key: _one_line(value) for key, value in args.items()}
        elif args:
            record.args = tuple(_one_line(value) for value in args)
        for name in _STAMPED:
            value = getattr(record, name, None)
            if isinstance(value, str) and _CONTROLS.search(value):
                setattr(record, name, escape_controls(value))
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s cid=%(cid)s service=%(service)s: %(message)s"


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with a record's exception as ``bounded_traceback`` shows it."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return bounded_traceback(ei[1]) if ei[1] is not None else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the structured fields esb sets in ``extra``."""

    FIELDS = _STAMPED

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
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = bounded_traceback(record.exc_info[1])
        return json.dumps(entry)


def _formatter(as_json: bool) -> logging.Formatter:
    return JsonFormatter() if as_json else TextFormatter()


def file_handler(log_file: Path, *, as_json: bool = False) -> logging.Handler:
    """A handler appending esb's log lines to LOG_FILE, for a logger of one part of a
    process that logs elsewhere (the launcher's pickup thread writes to server.log)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(_formatter(as_json))
    handler.addFilter(ContextFilter())
    handler.addFilter(OneLineValues())
    return handler


def setup_logging(log_file: Path | None, *, level: str = "INFO", as_json: bool = False) -> None:
    """Send the ``esb`` loggers (and gunicorn's) to LOG_FILE, or stderr when None."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(as_json))
    handler.addFilter(ContextFilter())
    handler.addFilter(OneLineValues())
    # gunicorn's own logger writes to server.log through handlers of its own.
    for own in logging.getLogger("gunicorn.error").handlers:
        own.addFilter(OneLineValues())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Drivers are chatty at DEBUG; keep them at WARNING unless asked otherwise.
    for noisy in ("kombu", "amqp", "apscheduler.scheduler", "sqlalchemy.engine"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _traceback_lines(te: traceback.TracebackException) -> Iterator[str]:
    """TE as ``TracebackException.format`` writes it, each exception's message (which may
    quote a payload) on one line, escaped."""
    if te.__cause__ is not None:
        yield from _traceback_lines(te.__cause__)
        yield _CAUSE
    elif te.__context__ is not None and not te.__suppress_context__:
        yield from _traceback_lines(te.__context__)
        yield _CONTEXT
    if te.stack:
        yield "Traceback (most recent call last):\n"
        yield from te.stack.format()
    yield escape_controls("".join(te.format_exception_only()).rstrip("\n")) + "\n"


def bounded_traceback(exc: BaseException) -> Traceback:
    """EXC's traceback, innermost TRACEBACK_FRAMES frames of each chained exception, cut to
    TRACEBACK_CHARS around the middle (the head says where, the tail what was raised)."""
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__, limit=-TRACEBACK_FRAMES)
    text = "".join(_traceback_lines(te))
    if len(text) > TRACEBACK_CHARS:
        half = TRACEBACK_CHARS // 2
        text = f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"
    return Traceback(text.rstrip("\n"))
