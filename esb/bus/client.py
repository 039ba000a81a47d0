"""The one way esb makes a Redis client: bounded pool, timeouts, and no hidden retries
unless the caller asks for them.

A loop that talks to Redis (heartbeats, the dispatch consumer, deploy subscriptions, the
scheduler's lease) decides its own retries with ``esb.observe.retry``; a client with
redis-py retries underneath it would multiply each wait: a Redis that accepts connections
but does not answer held a heartbeat for four socket timeouts, about 20 s. Such loops use
clients made with the default ``retries=0``. A caller that does not loop (a one-shot CLI
command, a service's own calls) may ask for a few jittered retries, so that a quick Redis
restart costs it a retry rather than an error.
"""

from __future__ import annotations

import select
import sys
from collections.abc import Callable
from importlib.metadata import version
from typing import Any
from urllib.parse import urlsplit

import redis
from redis import DriverInfo
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

# How esb's connections name themselves in CLIENT LIST. PERF(esb): made once; left to
# redis-py, every new connection read the package metadata again, about 1 ms each, paid
# 64 times by a worker whose first burst of work fills its pool.
_DRIVER_INFO = DriverInfo().add_upstream_driver("esb", version("esb"))



def original_poll() -> Callable[[], Any]:
    """The operating system's poll, even in a gevent worker where select.poll is gevent's.
    Without gevent.monkey loaded nothing is patched, and importing gevent only to ask
    would cost the processes without gevent (scheduler, CLI) 5 MB each."""
    monkey = sys.modules.get("gevent.monkey")
    return select.poll if monkey is None else monkey.get_original("select", "poll")


_os_poll = original_poll()


class _QuickReadinessCheck:
    """Answers the pool's "is anything unread on this connection?" without leaving the greenlet.

    PERF(esb): the pool asks this before lending a connection, for every command. redis-py
    asks through select.poll, which under gevent is a trip through the hub: about a third
    of the cost of a command on loopback. A zero-timeout poll never blocks, so the
    operating system's answers at once. Whenever bytes wait, or the parser may hold some,
    redis-py's own check decides.
    """

    def can_read(self, timeout: float = 0) -> bool:
        sock = self._sock
        if timeout == 0 and sock is not None and not _parser_may_hold_data(self._parser):
            poller = _os_poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return False
        return super().can_read(timeout)


def _parser_may_hold_data(parser) -> bool:
    reader = getattr(parser, "_reader", None)  # hiredis: replies read ahead of their caller
    return reader is None or not hasattr(reader, "has_data") or reader.has_data()


class TcpConnection(_QuickReadinessCheck, redis.Connection):
    pass


class UnixConnection(_QuickReadinessCheck, redis.UnixDomainSocketConnection):
    pass


# TLS keeps decrypted bytes above the socket, where poll cannot see them: rediss:// URLs
# keep redis-py's connection class.
_CONNECTION_CLASSES = {"redis": TcpConnection, "unix": UnixConnection}


def make_redis(
    url: str,
    *,
    socket_timeout_s: float = 5.0,
    max_connections: int = 64,
    retries: int = 0,
) -> redis.Redis:
    """A client on a blocking pool: callers wait for a free connection instead of opening more.

    Every command, and every wait for a pooled connection, fails after SOCKET_TIMEOUT_S.
    RETRIES > 0: a command that fails on a dropped or silent connection is retried that many
    times with jittered backoff; only for callers that do not retry themselves.
    """
    quick = _CONNECTION_CLASSES.get(urlsplit(url).scheme)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        **({"connection_class": quick} if quick else {}),
        max_connections=max_connections,
        timeout=socket_timeout_s,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=10,
        retry=Retry(
            ExponentialWithJitterBackoff(cap=1.0, base=0.05),
            retries,
            supported_errors=(RedisConnectionError, RedisTimeoutError),
        ),
        decode_responses=True,
        driver_info=_DRIVER_INFO,
    )
    return redis.Redis(connection_pool=pool)


def open_connections(client: redis.Redis, count: int) -> int:
    """Connect COUNT of CLIENT's pooled connections now and answer how many it opened.

    A worker's first burst of dispatched work otherwise opens them all at once, each a
    connect and a handshake, and the first services of the burst wait for them. Raises
    RedisError when Redis cannot be reached.
    """
    pool = client.connection_pool
    opened = [pool.get_connection() for _ in range(count)]
    for connection in opened:
        pool.release(connection)
    return len(opened)


def make_blocking_reader(url: str, *, block_s: float, socket_timeout_s: float = 5.0) -> redis.Redis:
    """A client for XREADGROUP ... BLOCK: it holds its connection, so it gets its own pool;
    its caller loops, so it has no retries."""
    return make_redis(url, socket_timeout_s=block_s + socket_timeout_s, max_connections=2)
