"""Three of gunicorn's per-request helpers, made cheaper inside an esb worker process.

gunicorn's request path formats the Date header, checks the peer against
``forwarded_allow_ips`` and writes through gevent's ``sendall`` on every request; on this
machine those three cost about as much as esb's whole app layer (``bench/README.md``).
Each replacement gives the same answers as the function it replaces, for the life of a
worker (whose configuration never changes: a reload starts new workers), and is
installed only in esb's gevent worker, so the arbiter and every other process keep
gunicorn as it is. ``install`` checks that each function is still where gunicorn 27 keeps
it and leaves anything it does not find untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gunicorn import util
from gunicorn.http import message

logger = logging.getLogger(__name__)

# Peers remembered per allow list; a worker talks to few distinct addresses behind a
# proxy, and the table is simply emptied when a flood of addresses fills it.
MAX_PEERS = 4096


def cached_http_date(format_date: Any) -> Any:
    """``util.http_date`` formatting the current second once, not once per request.

    PERF(esb): 0.15 us a call against 4.7 us for ``email.utils.formatdate`` (timeit,
    shared machine); the header has a resolution of one second anyway.
    """
    last = [-1, ""]

    def http_date(timestamp: float | None = None) -> str:
        if timestamp is not None:
            return format_date(timestamp)
        second = int(time.time())
        if second != last[0]:
            last[1] = format_date(second)
            last[0] = second
        return last[1]

    return http_date


def cached_allow_list(check: Any) -> Any:
    """``_ip_in_allow_list`` remembering its answer per peer address and allow list.

    PERF(esb): a dict lookup against 3.6 us for parsing the address with ``ipaddress`` and
    testing it against each network, on every request. The allow lists are the worker's
    configuration, fixed for its life; an entry keeps its lists and is used only for the
    very same list objects.
    """
    answers: dict[tuple[str, int, int], tuple[Any, Any, bool]] = {}

    def ip_in_allow_list(ip_str: str, allow_list: Any, networks: Any) -> bool:
        key = (ip_str, id(allow_list), id(networks))
        found = answers.get(key)
        if found is not None and found[0] is allow_list and found[1] is networks:
            return found[2]
        answer = check(ip_str, allow_list, networks)
        if len(answers) >= MAX_PEERS:
            answers.clear()
        answers[key] = (allow_list, networks, answer)
        return answer

    return ip_in_allow_list


def direct_write(write_chunk: Any) -> Any:
    """``util.write`` trying one plain ``send`` before gevent's ``sendall``.

    PERF(esb): gevent's ``sendall`` asks the socket for its buffer size (a system call)
    and slices a memoryview before it sends anything; an answer of a few KiB fits the
    socket buffer and leaves with the first ``send``, so that is tried first and
    ``sendall`` only sends what is left.
    """

    def write(sock: Any, data: bytes, chunked: bool = False) -> None:
        if chunked:
            return write_chunk(sock, data)
        sent = sock.send(data) if data else 0
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
        return None

    return write


def install() -> None:
    """Put the three replacements in place, in this process only."""
    replaced = []
    if callable(getattr(util, "http_date", None)):
        util.http_date = cached_http_date(util.http_date)
        replaced.append("http_date")
    if callable(getattr(message, "_ip_in_allow_list", None)):
        message._ip_in_allow_list = cached_allow_list(message._ip_in_allow_list)
        replaced.append("_ip_in_allow_list")
    if callable(getattr(util, "write", None)) and callable(getattr(util, "write_chunk", None)):
        util.write = direct_write(util.write_chunk)
        replaced.append("write")
    logger.debug("gunicorn helpers replaced in this worker: %s", ", ".join(replaced) or "none")
