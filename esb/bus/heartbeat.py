"""Heartbeats: a hash per live component, refreshed on an interval, expiring when it stops."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

import redis
from redis.exceptions import RedisError

from esb.bus.client import make_redis
from esb.observe.retry import Retrying

logger = logging.getLogger(__name__)


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def heartbeat_client(url: str, *, interval_s: float, ttl_s: float) -> redis.Redis:
    """A client of a heartbeat's own: no retries under the heartbeat's loop, two connections
    of its own (a pool busy with a component's work cannot hold a beat up), and a socket
    timeout that lets one beat and the wait after it fit in one staleness period (TTL_S).

    So a Redis that accepts connections but does not answer costs a beat less than a
    staleness period, and the next beat after it answers again comes within an interval.
    """
    return make_redis(url, socket_timeout_s=max(ttl_s - interval_s, 0.5), max_connections=2, retries=0)


class Heartbeat:
    """Writes ``fields() | {last_heartbeat}`` to KEY every ``interval_s``; the key expires after
    ``ttl_s`` so a component killed with -9 disappears by itself.

    ``run_forever`` is a plain loop: run it in a greenlet in a gevent worker, in a thread
    elsewhere. A Redis outage is logged once per change of state and retried (at the
    ``BACKING_SERVICE`` intervals, never slower than ``interval_s``); it never stops the
    loop. CLIENT should come from ``heartbeat_client``: a client with retries or a long
    socket timeout lets a silent Redis hold a beat for longer than a staleness period.
    """

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        fields: Callable[[], dict[str, str]],
        *,
        interval_s: float,
        ttl_s: float,
    ):
        self.client = client
        self.key = key
        self.fields = fields
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        self._stopped = threading.Event()
        self._retrying = Retrying(logger, f"heartbeat {key}")

    def beat(self) -> None:
        values = self.fields() | {"last_heartbeat": utc_now_iso()}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.key, mapping=values)
        pipe.pexpire(self.key, self.ttl_ms)
        pipe.execute()

    def run_forever(self) -> None:
        while not self._stopped.is_set():
            try:
                self.beat()
                self._retrying.succeeded()
                wait_s = self.interval_s
            except RedisError as exc:
                wait_s = min(self._retrying.failed(exc), self.interval_s)
            # Sleep in small steps so stop() is prompt (time.sleep is gevent's in a worker).
            deadline = time.monotonic() + wait_s
            while not self._stopped.is_set() and time.monotonic() < deadline:
                time.sleep(min(0.2, self.interval_s))

    def stop(self) -> None:
        """Stop beating and remove the key, so status drops this component at once."""
        self._stopped.set()
        try:
            self.client.delete(self.key)
        except RedisError:
            logger.debug("heartbeat %s: could not delete key on stop; it will expire", self.key)


def rows_of(heartbeats: list[dict[str, str]], field: str) -> Iterator[tuple[int, dict]]:
    """``(pid, row)`` for every row of the JSON list FIELD of each heartbeat hash, the way a
    worker publishes per-pool or per-channel facts; a field that is not JSON is passed over."""
    for fields in heartbeats:
        try:
            rows = json.loads(fields.get(field) or "[]")
        except ValueError:
            continue
        pid = int(fields.get("pid", 0))
        for row in rows:
            yield pid, row
