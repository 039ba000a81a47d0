"""Who is running what, right now: the cid and service of each call, per greenlet.

The loop-block monitor and the WORKER TIMEOUT hook read it to name the service that holds
the loop; the call's cid and service go to ``esb.observe.context`` for the log lines.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import NamedTuple

import greenlet

from esb.errors import InvokeDepthError
from esb.observe.context import current_cid, current_service


class RunningCall(NamedTuple):
    """One call in progress. PERF(esb): a NamedTuple, immutable as the frozen dataclass it
    was, made in 0.6 us instead of 2.0 (one per service call; ``bench/README.md``)."""

    service: str
    cid: str
    started: float  # time.monotonic()
    depth: int = 0  # 0 for the outermost call of a greenlet, +1 per nested invoke


class RunningCalls:
    """Calls in progress by greenlet. PERF(esb): one dict write and delete per call."""

    def __init__(self) -> None:
        self.by_greenlet: dict[greenlet.greenlet, RunningCall] = {}

    @contextlib.contextmanager
    def track(self, service: str, cid: str, max_depth: int | None = None) -> Iterator[None]:
        """Record the call for the duration of the block (``enter`` and ``leave`` around it).

        Raises InvokeDepthError, before the block runs, when the call would be nested
        more than MAX_DEPTH levels deep in this greenlet.
        """
        entered = self.enter(service, cid, max_depth)
        try:
            yield
        finally:
            self.leave(entered)

    def enter(self, service: str, cid: str, max_depth: int | None = None) -> tuple:
        """Record the start of a call; hand what it returns to ``leave`` in a ``finally``.

        PERF(esb): the request path's form of ``track``; a generator context manager costs
        about 1.5 us a call more (``bench/README.md``). Raises InvokeDepthError, recording
        nothing, when the call would be nested more than MAX_DEPTH levels deep.
        """
        current = greenlet.getcurrent()
        outer = self.by_greenlet.get(current)
        depth = 0 if outer is None else outer.depth + 1
        if max_depth is not None and depth > max_depth:
            raise InvokeDepthError(service, max_depth)
        self.by_greenlet[current] = RunningCall(service, cid, time.monotonic(), depth)
        return current, outer, current_cid.set(cid), current_service.set(service)

    def leave(self, entered: tuple) -> None:
        """Record the end of the call ENTERED (what ``enter`` returned)."""
        current, outer, cid_token, service_token = entered
        current_service.reset(service_token)
        current_cid.reset(cid_token)
        if outer is None:
            self.by_greenlet.pop(current, None)
        else:
            self.by_greenlet[current] = outer

    def of(self, glet: greenlet.greenlet) -> RunningCall | None:
        return self.by_greenlet.get(glet)

    def snapshot(self) -> list[RunningCall]:
        return list(self.by_greenlet.values())


running_calls = RunningCalls()


def current_call() -> RunningCall | None:
    return running_calls.of(greenlet.getcurrent())
