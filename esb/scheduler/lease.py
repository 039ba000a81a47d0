"""The scheduler lease: exactly one scheduler of a cluster dispatches, the others stand by.

The lease is one Redis key holding the active instance's id with a TTL. The holder renews
it well before it lapses; anyone takes it with SET NX once it has lapsed, so a standby
takes over within one TTL (plus one renewal period) of the active scheduler's death.
Renewal and release compare the value first, so a scheduler that lost the lease while it
was stopped or cut off can never extend or delete its successor's.
"""

from __future__ import annotations

import logging
import time

import redis
from redis.exceptions import RedisError

from esb.bus.scripts import LuaScript
from esb.observe.retry import Retrying

logger = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """Holds or waits for KEY on behalf of INSTANCE; ``refresh()`` is called from one loop.

    ``has_lease`` is also bounded locally: it turns false once a TTL has passed since the
    last confirmed renewal, even while Redis does not answer, so a cut-off scheduler stops
    dispatching on its own (dispatch is fenced in Redis as well).
    """

    def __init__(self, client: redis.Redis, key: str, instance: str, *, ttl_s: float):
        self.client = client
        self.key = key
        self.instance = instance
        self.ttl_ms = int(ttl_s * 1000)
        self.ttl_s = ttl_s
        self._valid_until = 0.0  # time.monotonic()
        self._renew = LuaScript(client, _RENEW)
        self._release = LuaScript(client, _RELEASE)
        # The renewal loop is the scheduler's tick; this only keeps the outage's words.
        self._retrying = Retrying(logger, f"scheduler lease {key} (standing by until it answers)")

    @property
    def has_lease(self) -> bool:
        return time.monotonic() < self._valid_until

    @property
    def renew_interval_s(self) -> float:
        return self.ttl_s / 3

    def refresh(self) -> bool:
        """Renew the lease if held, else try to take it; True when this instance holds it.

        Never raises: a Redis error counts as not holding it, logged once per outage.
        """
        started = time.monotonic()
        try:
            held = bool(self._renew(keys=[self.key], args=[self.instance, self.ttl_ms])) or bool(
                self.client.set(self.key, self.instance, nx=True, px=self.ttl_ms)
            )
        except RedisError as exc:
            self._retrying.failed(exc)
            return self.has_lease
        self._retrying.succeeded()
        # Count the TTL from before the call: the key may have been set that long ago.
        self._valid_until = started + self.ttl_s if held else 0.0
        return held

    def forfeit(self) -> None:
        """Stop counting on the lease at once (Redis said another instance holds it)."""
        self._valid_until = 0.0

    def holder(self) -> str | None:
        """The instance id holding the lease now, or None (also when Redis is down)."""
        try:
            return self.client.get(self.key)
        except RedisError:
            return None

    def release(self) -> None:
        """Give the lease up at once so a standby need not wait for the TTL; never raises."""
        self._valid_until = 0.0
        try:
            self._release(keys=[self.key], args=[self.instance])
        except RedisError as exc:
            logger.warning("scheduler lease %s not released (%s); it lapses in %.1f s",
                           self.key, exc, self.ttl_s)
