"""``esb.imports.defer_redis_asyncio``: the body of ``redis.asyncio`` waits for its first
use, and whoever uses it gets the real module."""

from __future__ import annotations

from tests.helpers import modules_loaded_by

DEFERRED = """
from esb.imports import defer_redis_asyncio
assert defer_redis_asyncio() and defer_redis_asyncio()  # once per process
import sys, redis
from redis.exceptions import RedisError
assert "redis.asyncio.client" not in sys.modules and "redis.asyncio" in sys.modules
assert redis.Redis.from_url("redis://127.0.0.1:6379/0").ping()  # the blocking client as before
"""


def test_redis_asyncio_body_waits_until_used():
    loaded = modules_loaded_by(DEFERRED)
    assert "redis.asyncio.client" not in loaded and "redis.asyncio.cluster" not in loaded


def test_the_first_use_gets_the_real_module_in_every_form():
    probe = DEFERRED + """
import asyncio, threading
import redis.asyncio
from redis.asyncio import Redis as FromImport
from redis.asyncio.client import Redis as Real
assert FromImport is Real and redis.asyncio.Redis is Real and redis.asyncio.client.Redis is Real
assert "Redis" in dir(redis.asyncio) and "__getattr__" not in vars(redis.asyncio)
try:
    redis.asyncio.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("a missing name must still raise AttributeError")

async def ping():
    client = redis.asyncio.from_url("redis://127.0.0.1:6379/0")
    try:
        return await client.ping()
    finally:
        await client.aclose()

assert asyncio.run(ping())
"""
    modules_loaded_by(probe)


def test_threads_that_ask_at_once_all_wait_for_the_whole_body():
    probe = DEFERRED + """
import threading
import redis.asyncio
from redis.asyncio.client import Redis as Real

barrier, seen = threading.Barrier(8), []
def use():
    barrier.wait()
    seen.append((redis.asyncio.Redis, redis.asyncio.Sentinel))
threads = [threading.Thread(target=use) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(seen) == 8 and all(pair[0] is Real for pair in seen)
"""
    modules_loaded_by(probe)


def test_too_late_once_redis_is_imported():
    modules_loaded_by("import redis\nfrom esb.imports import defer_redis_asyncio\n"
                      "assert not defer_redis_asyncio()")
