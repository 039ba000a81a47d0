"""esb's gevent worker: gunicorn's ``GeventWorker``, whose own answers look like esb's.

gunicorn answers a request its parser refuses (a bad request line, a line or header
section over its limits, a malformed Content-Length or chunk) with an HTML page of its
own, before the app sees anything. Here those answers are the JSON error body every esb
answer carries, with a cid, logged in one line.

Two connection-level policies live here too. Fairness: gevent switches greenlets only when
one blocks, and a keep-alive connection whose next request is already waiting never
blocks, so a few busy clients would be served in bursts while the others wait (seconds
of tail latency at 50 connections); the worker yields to the hub once between two
requests of a connection. Stopping: a connection waiting for its next request is closed
as soon as the worker is told to stop, instead of holding the worker for its keep-alive
time; a request being answered finishes, and its connection closes after it.
"""

from __future__ import annotations

import http
import json
import logging
import os
import resource
import socket
from typing import Any

import gevent
from gevent import get_hub, getcurrent
from gevent.event import Event
from gevent.monkey import get_original
from greenlet import GreenletExit
from gunicorn.http import errors as parser_errors
from gunicorn.workers import ggevent
from gunicorn.workers.ggevent import GeventWorker

from esb.observe.context import cid_or_new
from esb.observe.logs import bounded_traceback
from esb.server import gunicorn_tuning

logger = logging.getLogger(__name__)

CID_HEADER = "X-ESB-CID"
INTERNAL_ERROR = "internal error; see the server log for this cid"

# What each of gunicorn's parser errors answers; the most specific class in the MRO wins,
# anything else (an exception escaping the app, which esb's error handlers should have
# answered) is a 500.
STATUS_OF: dict[type[BaseException], int] = {
    parser_errors.LimitRequestLine: 414,
    parser_errors.LimitRequestHeaders: 431,
    parser_errors.UnsupportedTransferCoding: 501,
    parser_errors.ExpectationFailed: 417,
    parser_errors.ForbiddenProxyRequest: 403,
    parser_errors.ConfigurationProblem: 500,
    parser_errors.InvalidResponseHeader: 500,
    parser_errors.InvalidResponseHeaderName: 500,
    parser_errors.ParseException: 400,
}
# File descriptors a worker keeps for itself beyond its connections (logs, Redis, ODB).
SPARE_FDS = 256
# Once told to stop, how often the worker looks whether its last requests have finished.
STOP_POLL_S = 0.02


def status_of(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def cid_of_request(req: Any) -> str:
    """The cid a refused request gets: its X-ESB-CID if the parser got that far and it is a
    plain token of at most 64 characters, else a new one."""
    for name, value in getattr(req, "headers", None) or ():
        if name == CID_HEADER.upper():
            return cid_or_new(value)
    return cid_or_new(None)


def error_answer(status: int, message: str, cid: str) -> bytes:
    """A whole HTTP/1.1 answer with esb's error body, closing the connection."""
    body = json.dumps({"error": message, "cid": cid}).encode()
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{CID_HEADER}: {cid}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def raise_fd_limit(wanted: int) -> None:
    """Raise this process's soft limit of open files towards WANTED (never above the hard
    limit): a worker must be able to hold the connections it accepts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target < wanted:
        logger.warning(
            "open-file limit %d is below the %d a worker of %d connections needs; lower "
            "[main] worker_connections or raise the hard limit (ulimit -Hn)",
            hard,
            wanted,
            wanted - SPARE_FDS,
        )
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)


def take_turn() -> None:
    """Let every other greenlet that is ready run once before this one goes on.

    PERF(esb): one hub switch through a loop callback, as ``gevent.sleep(0)`` does but
    without its Waiter: 0.9 us a turn against 1.2 us for ``sleep(0)`` (best of 10,
    ``bench/app_cost.py``, CPU 1). A greenlet killed while it waits leaves no callback
    behind to switch into it later.
    """
    hub = get_hub()
    pending = hub.loop.run_callback(getcurrent().switch)
    try:
        hub.switch()
    finally:
        pending.stop()


def close_now(client: Any) -> None:
    """Shut CLIENT's connection down under the greenlet that reads it: its read ends as if
    the client had closed (gunicorn's quiet path), not with an error thrown into it as
    gevent's own ``shutdown`` would. Safe in a signal handler: no greenlet switch."""
    plain_socket = get_original("socket", "socket")
    try:
        with plain_socket(client.family, client.type, 0, os.dup(client.fileno())) as dup:
            dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by either side


class _WakeableGevent:
    """Stands for the gevent module in gunicorn's ``ggevent`` in a worker, where only its
    ``sleep`` differs: one that a stop request cuts short.

    Why: ``GeventWorker.run`` looks at ``self.alive`` once a second (``gevent.sleep(1.0)``)
    and, once stopping, at its open connections once a second again, so a SIGTERM cost a
    worker 0.5 to 2 s of doing nothing before it exited, the larger part of `esb stop`.
    Here the first wait ends when the stop is asked, and the second is a poll every
    STOP_POLL_S; requests in flight still finish within the graceful timeout, as before.
    """

    def __init__(self, stop_asked: Event):
        self._stop_asked = stop_asked

    def __getattr__(self, name: str) -> Any:
        return getattr(gevent, name)

    def sleep(self, seconds: float = 0, ref: bool = True) -> None:
        if seconds <= 0:
            gevent.sleep(seconds, ref)
        elif not self._stop_asked.is_set():
            self._stop_asked.wait(seconds)
        else:
            gevent.sleep(min(seconds, STOP_POLL_S), ref)


class EsbGeventWorker(GeventWorker):
    """gunicorn's gevent worker with esb's error answers, enough file descriptors, a turn
    for every connection, and idle connections closed at once on stop."""

    def init_process(self) -> None:
        raise_fd_limit(self.worker_connections + SPARE_FDS)
        gunicorn_tuning.install()
        # Connections waiting for their next request (or their first): closed on stop.
        self.idle_clients: set[Any] = set()
        self.stop_asked: Event | None = None  # made in run(), on the hub init_process makes
        super().init_process()

    def run(self) -> None:
        self.stop_asked = Event()
        if not self.alive:
            self.stop_asked.set()  # told to stop while it booted
        ggevent.gevent = _WakeableGevent(self.stop_asked)  # this process runs one worker: this one
        super().run()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self.idle_clients.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self.idle_clients.discard(client)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool | None:
        """Answer one request; before reading the next one on this connection, let the
        other connections take their turn."""
        self.idle_clients.discard(sock)
        done = super().handle_request(listener_name, req, sock, addr)
        # Only reached when the connection stays open (gunicorn raises StopIteration when
        # it closes). Told to stop before or while this request ran: it closes here.
        try:
            take_turn()
        except GreenletExit:
            raise StopIteration from None  # killed at the graceful timeout: close quietly
        if not self.alive:
            raise StopIteration
        self.idle_clients.add(sock)
        return done

    def handle_http2(self, listener: Any, client: Any, addr: Any, *args: Any, **kwargs: Any) -> None:
        """An HTTP/2 connection multiplexes its requests: never idle for the stop's purpose."""
        self.idle_clients.discard(client)
        super().handle_http2(listener, client, addr, *args, **kwargs)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM, a graceful stop: close the idle connections now; requests in flight finish.

        A request whose first bytes are arriving at this very moment is not in flight yet:
        its connection is closed with the idle ones, as a client must expect of any idle
        keep-alive connection, and nothing of it has run.
        """
        super().handle_exit(sig, frame)
        for client in list(self.idle_clients):
            close_now(client)
        if self.stop_asked is not None:
            self.stop_asked.set()  # no switch: it schedules the waiter's wake-up on the hub

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer what gunicorn could not hand to the app, in JSON with a cid, logged once."""
        status = status_of(exc)
        cid = cid_of_request(req if req is not None else getattr(exc, "req", None))
        ip = addr[0] if isinstance(addr, tuple) and addr else "-"
        message = f"{type(exc).__name__}: {exc}"[:300] if status < 500 else INTERNAL_ERROR
        if isinstance(exc, parser_errors.ParseException):
            what = f"{type(exc).__name__}: {exc}"[:300]
            logger.warning("invalid request from %s answered %d: %s", ip, status, what, extra={"cid": cid})
        else:
            logger.error(
                "request from %s ended with %s, which no esb handler answered; answering %d\n%s",
                ip,
                type(exc).__name__,
                status,
                bounded_traceback(exc),
                extra={"cid": cid},
            )
        try:
            client.sendall(error_answer(status, message, cid))
        except OSError as send_exc:
            logger.debug("could not send the %d answer to %s: %s", status, ip, send_exc)
