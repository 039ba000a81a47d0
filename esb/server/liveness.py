"""A worker's liveness key, kept fresh by a native thread that a busy event loop cannot starve.

Why a native thread: a service that holds the CPU without yielding (a pure-Python loop)
stops every greenlet of its worker, so a greenlet heartbeat would go silent and another
worker would reclaim, and run a second time, a message that is still running. A native
thread is preempted by the interpreter's switch interval (5 ms), so it keeps beating
however busy the loop is; it stops only when the whole process stops: killed, SIGSTOPped,
or killed by the arbiter after ``[main] timeout``. Exactly the cases where reclaiming is
right.

Why its own socket speaking RESP: in a gevent worker ``socket.socket`` is gevent's, and
a gevent socket waits on a hub. A redis-py client used from a native thread would either
share the main thread's hub (not thread-safe) or silently start a second hub in this
thread, with redis-py's pool locks and queues patched to gevent's. The operating
system's socket (``monkey.get_original``) blocks only this thread, touches no hub and
needs nothing from redis-py but its URL parser: three commands (AUTH, SELECT, SET ... PX)
are all it sends. The thread must not touch anything gevent patched: name resolution
(``socket.getaddrinfo`` is gevent's resolver) and the logging module's locks would give
this thread a hub of its own, which gevent's monitor then reports as a blocked loop. So
it resolves with the original ``getaddrinfo`` and writes its two kinds of log line (first
failure, recovery) straight to the log file's descriptor, as the loop-block monitor does.
``rediss://`` URLs would need the unpatched TLS stack too; for those the
beat runs in a greenlet instead, and a CPU-bound service longer than the TTL may then be
reclaimed (logged once at start).
"""

from __future__ import annotations

import logging
import os
import socket as _socket_module
from typing import Any

import gevent
from gevent import monkey
from redis.connection import parse_url
from redis.exceptions import RedisError

from esb.observe.blocking import _log_fd
from esb.observe.retry import Retrying

logger = logging.getLogger(__name__)

_os_socket = monkey.get_original("socket", "socket")
_os_getaddrinfo = monkey.get_original("socket", "getaddrinfo")
_os_sleep = monkey.get_original("time", "sleep")
_os_start_thread = monkey.get_original("_thread", "start_new_thread")

SOCKET_TIMEOUT_S = 2.0


def _command(*parts: str | bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _connect_tcp(host: str, port: int) -> Any:
    """An operating-system TCP socket connected to HOST:PORT, trying each address in turn."""
    error: OSError | None = None
    for family, kind, proto, _name, address in _os_getaddrinfo(host, port, 0, _socket_module.SOCK_STREAM):
        sock = _os_socket(family, kind, proto)
        sock.settimeout(SOCKET_TIMEOUT_S)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error or OSError(f"cannot resolve {host}")


class _FdLogger:
    """The three methods Retrying logs through, writing one line straight to the log file's
    descriptor: no lock of the logging module, which is gevent's in a worker."""

    def __init__(self, name: str):
        self.name = name
        self.fd = _log_fd()
        self.pid = os.getpid()

    def _write(self, level: str, msg: str, *args: object) -> None:
        line = f"{level} [{self.pid}] {self.name}: {msg % args}\n"
        try:
            os.write(self.fd, line.encode("utf-8", "replace"))
        except OSError:
            pass  # nowhere left to say it; status shows the worker's liveness anyway

    def warning(self, msg: str, *args: object) -> None:
        self._write("WARNING", msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self._write("INFO", msg, *args)

    def debug(self, msg: str, *args: object) -> None:
        pass


class NativeLiveness:
    """Sets KEY with a TTL of ``ttl_s`` every ``interval_s`` from a native thread.

    ``start()`` begins beating, ``stop()`` ends the thread and answers at once (the caller
    deletes the key through its ordinary client). A Redis that does not answer is retried
    every interval; the first failure and the recovery are logged.
    """

    def __init__(self, url: str, key: str, *, ttl_s: float, interval_s: float):
        self.url = url
        self.key = key
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self.interval_s = interval_s
        self._stopped = False
        self._sock: Any = None
        self._buffer = b""
        # Only for its logging (first failure, recovery): a beat is tried every interval
        # whatever the policy says, since the key's TTL is what another worker waits on.
        self._retrying = Retrying(logger, f"Redis: liveness {key}")

    def start(self) -> None:
        if self.url.startswith("rediss://"):
            logger.warning(
                "liveness of %s beats from a greenlet: a TLS Redis URL needs gevent's ssl; a "
                "service holding the loop longer than %.1f s may have its message reclaimed",
                self.key,
                self.ttl_ms / 1000,
            )
            gevent.spawn(self._run_in_greenlet)
            return
        self._retrying.logger = _FdLogger(__name__)  # type: ignore[assignment]
        _os_start_thread(self._run, ())

    def stop(self) -> None:
        self._stopped = True

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            self._beat_logged()
            slept = 0.0
            while not self._stopped and slept < self.interval_s:
                _os_sleep(0.1)
                slept += 0.1
        self._close()

    def _run_in_greenlet(self) -> None:
        from esb.bus import make_redis

        client = make_redis(self.url, socket_timeout_s=SOCKET_TIMEOUT_S, max_connections=1)
        while not self._stopped:
            try:
                client.set(self.key, "1", px=self.ttl_ms)
            except RedisError as exc:
                self._retrying.failed(exc)
            else:
                self._retrying.succeeded()
            gevent.sleep(self.interval_s)

    def _beat_logged(self) -> None:
        try:
            self.beat()
        except (OSError, ValueError) as exc:
            self._close()
            self._retrying.failed(exc)
            return
        self._retrying.succeeded()

    def beat(self) -> None:
        """One SET KEY 1 PX ttl, connecting first if needed; raises OSError or ValueError."""
        if self._sock is None:
            self._connect()
        self._sock.sendall(_command("SET", self.key, "1", "PX", self.ttl_ms))
        self._expect_ok()

    def _connect(self) -> None:
        options = parse_url(self.url)
        if options.get("path"):
            sock = _os_socket(_socket_module.AF_UNIX, _socket_module.SOCK_STREAM)
            sock.settimeout(SOCKET_TIMEOUT_S)
            try:
                sock.connect(options["path"])
            except OSError:
                sock.close()
                raise
        else:
            sock = _connect_tcp(options.get("host", "127.0.0.1"), int(options.get("port", 6379)))
        self._sock = sock
        self._buffer = b""
        password = options.get("password")
        if password:
            username = options.get("username")
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self._sock.sendall(_command(*auth))
            self._expect_ok()
        db = int(options.get("db", 0) or 0)
        if db:
            self._sock.sendall(_command("SELECT", db))
            self._expect_ok()

    def _expect_ok(self) -> None:
        while b"\r\n" not in self._buffer:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise OSError("connection closed by Redis")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        if not line.startswith(b"+"):
            raise ValueError(line.decode(errors="replace"))

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
