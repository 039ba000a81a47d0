"""The cid and service of the running call, as context variables, and the logging filter
that stamps them on every log line.

Which call each greenlet runs is ``esb.observe.calls``: this module imports no greenlet,
so the launcher and the scheduler, which log but run no greenlets, do not load it
(greenlet and the C++ runtime it links: 1.1 MB of RSS in each).
"""

from __future__ import annotations

import contextvars
import logging
import os
import re

current_cid: contextvars.ContextVar[str | None] = contextvars.ContextVar("esb_cid", default=None)
current_service: contextvars.ContextVar[str | None] = contextvars.ContextVar("esb_service", default=None)


# A cid from outside (an X-ESB-CID header, an AMQP correlation_id) is taken only in this
# form: it goes into every log line of its call, unescaped.
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def cid_or_new(incoming: object) -> str:
    """INCOMING if it is a plain token (letters, digits, '.', '_', '-') of at most 64
    characters, else a new cid.

    PERF(esb): os.urandom().hex() costs a quarter of uuid4().hex on the request path.
    """
    if isinstance(incoming, str) and _PLAIN_TOKEN.fullmatch(incoming):
        return incoming
    return os.urandom(16).hex()


class ContextFilter(logging.Filter):
    """Adds ``cid`` and ``service`` to every record, from the running call if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "cid"):
            record.cid = current_cid.get() or "-"
        if not hasattr(record, "service"):
            record.service = current_service.get() or "-"
        return True
