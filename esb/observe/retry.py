"""One retry policy for every loop that talks to something that can go away.

A policy is four numbers, in the spirit of kombu's ``Connection.ensure``: the first
interval, how much each further failure adds, the ceiling, and how many retries a caller
that gives up may make. ``Retrying`` is the state of one such loop: it says how long to
wait before the next attempt and logs once per change of state (the first failure at
WARNING, the recovery at INFO, the repeats in between at DEBUG), so a loop that retries
every second for an hour writes two lines, not 3,600.

Loops that already retry (heartbeats, lease renewals, stream reads, subscriptions, the
launcher's restarts) use ``Retrying`` directly; a single call that should be retried a
bounded number of times uses ``ensure``. Clients under such loops get no hidden retries
of their own (``esb.bus.client``): a retry is decided in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Delays between attempts: ``interval_start_s``, then ``+ interval_step_s`` after each
    further failure, never above ``interval_max_s``; ``max_retries`` None retries forever."""

    interval_start_s: float = 0.5
    interval_step_s: float = 1.0
    interval_max_s: float = 5.0
    max_retries: int | None = None

    def interval_s(self, failures: int) -> float:
        """The wait after the FAILURES-th consecutive failure (1 for the first)."""
        return min(self.interval_start_s + self.interval_step_s * max(failures - 1, 0), self.interval_max_s)


#: Redis and the ODB, from loops that run for the life of a process.
BACKING_SERVICE = RetryPolicy(interval_start_s=0.2, interval_step_s=0.5, interval_max_s=2.0)
#: The launcher's restarts of a child process that died: the first within a second
#: (ARCHITECTURE: "started again within 2 s"), one that keeps dying at the ceiling.
CHILD_RESTART = RetryPolicy(interval_start_s=0.5, interval_step_s=1.0, interval_max_s=30.0)


def unreachable(service: str, what: str) -> str:
    """The words for an outage, the same in every log line and status problem:
    ``Redis unreachable: heartbeat of worker 42``."""
    return f"{service} unreachable: {what}"


def reachable_again(service: str, what: str) -> str:
    """The words for the end of an outage: ``Redis works again: heartbeat of worker 42``."""
    return f"{service} works again: {what}"


class Retrying:
    """The retry state of one loop: consecutive failures, when to try next, what to log.

    ``failed(exc)`` answers how long to wait (and records when the next try is due, for
    loops that poll ``is_due()`` instead of sleeping); ``succeeded()`` resets. SERVICE
    names what went away and WHAT the loop that noticed, so every line of an outage reads
    alike: ``Redis unreachable: heartbeat of worker 42 (TimeoutError: ...); retrying in
    0.2 s``, then ``Redis works again: heartbeat of worker 42 (after 7 failed attempts)``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        policy: RetryPolicy = BACKING_SERVICE,
        *,
        service: str = "Redis",
    ):
        self.logger = logger
        self.what = what
        self.service = service
        self.policy = policy
        self.failures = 0
        self.last_error: str | None = None
        self._next_try = 0.0  # time.monotonic()

    @property
    def is_failing(self) -> bool:
        return self.failures > 0

    @property
    def is_exhausted(self) -> bool:
        limit = self.policy.max_retries
        return limit is not None and self.failures > limit

    def is_due(self) -> bool:
        """True when a loop that polls may try again."""
        return time.monotonic() >= self._next_try

    def seconds_until_due(self) -> float:
        return max(self._next_try - time.monotonic(), 0.0)

    def failed(self, exc: BaseException, *, service: str | None = None) -> float:
        """Record one failure and answer the seconds to wait before the next attempt.

        SERVICE names what went away this time, for a loop that talks to more than one.
        """
        if service is not None:
            self.service = service
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        delay_s = self.policy.interval_s(self.failures)
        self._next_try = time.monotonic() + delay_s
        if self.failures == 1:
            self.logger.warning(
                "%s (%s); retrying in %.1f s", unreachable(self.service, self.what), self.last_error, delay_s
            )
        else:
            self.logger.debug(
                "%s (%s, %d in a row); retrying in %.1f s",
                unreachable(self.service, self.what),
                self.last_error,
                self.failures,
                delay_s,
            )
        return delay_s

    def succeeded(self) -> None:
        if self.failures:
            self.logger.info(
                "%s (after %d failed attempts)", reachable_again(self.service, self.what), self.failures
            )
        self.failures = 0
        self.last_error = None
        self._next_try = 0.0


def ensure(
    call: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    retrying: Retrying,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run CALL until it succeeds, waiting as RETRYING's policy says after each failure of
    a RETRY_ON kind; once ``max_retries`` are spent, the last error is raised.

    ``time.sleep`` is gevent's in a patched worker, so this yields there.
    """
    while True:
        try:
            result = call()
        except retry_on as exc:
            delay_s = retrying.failed(exc)
            if retrying.is_exhausted:
                retrying.logger.error(
                    "%s: giving up after %d attempts",
                    unreachable(retrying.service, retrying.what),
                    retrying.failures,
                )
                raise
            sleep(delay_s)
        else:
            retrying.succeeded()
            return result
