"""The cid and service of the running call, as context variables, and the logging filter
that stamps them on every log line.

Which call each greenlet runs is ``esb.observe.calls``: this module imports no greenlet,
so the launcher and the scheduler, which log but run no greenlets, do not load it
(greenlet and the C++ runtime it links: 1.1 MB of RSS in each).
"""

from __future__ import annotations

import contextvars
import logging

current_cid: contextvars.ContextVar[str | None] = contextvars.ContextVar("esb_cid", default=None)
current_service: contextvars.ContextVar[str | None] = contextvars.ContextVar("esb_service", default=None)


class ContextFilter(logging.Filter):
    """Adds ``cid`` and ``service`` to every record, from the running call if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "cid"):
            record.cid = current_cid.get() or "-"
        if not hasattr(record, "service"):
            record.service = current_service.get() or "-"
        return True
