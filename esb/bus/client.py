"""The one way esb makes a Redis client: bounded pool, timeouts, jittered retries."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry


def make_redis(
    url: str,
    *,
    socket_timeout_s: float = 5.0,
    max_connections: int = 64,
    retries: int = 3,
) -> redis.Redis:
    """A client on a blocking pool: callers wait for a free connection instead of opening more.

    Commands that fail on a dropped connection are retried with jittered backoff, so a Redis
    restart costs a retry, not an error, when it is quick enough.
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
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
    )
    return redis.Redis(connection_pool=pool)


def make_blocking_reader(url: str, *, block_s: float, socket_timeout_s: float = 5.0) -> redis.Redis:
    """A client for XREADGROUP ... BLOCK: it holds its connection, so it gets its own pool."""
    return make_redis(url, socket_timeout_s=block_s + socket_timeout_s, max_connections=2)
