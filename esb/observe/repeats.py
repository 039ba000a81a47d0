"""Rate-limiting repeated identical warnings, with a count of what was left out.

A warning that a condition still holds (a loop still blocked, a peer still down) says
nothing new the second time; one line per ``every_s`` per key, telling how many were
suppressed in between, keeps the log readable and impossible to flood.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _Seen:
    first: float
    last_emitted: float
    last_seen: float
    suppressed: int = 0


class Repeats:
    """Decides, per key, whether a warning is written now. Not thread-safe: one owner."""

    MAX_KEYS = 256

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._seen: dict[object, _Seen] = {}

    def check(self, key: object, now: float | None = None) -> tuple[bool, int, float]:
        """(write it?, how many were suppressed since the last one written, seconds since
        the key was first seen). A key unseen for ``every_s`` starts afresh."""
        now = time.monotonic() if now is None else now
        seen = self._seen.get(key)
        if seen is None or now - seen.last_seen >= self.every_s:
            if len(self._seen) >= self.MAX_KEYS:
                self._forget(now)
            self._seen[key] = _Seen(first=now, last_emitted=now, last_seen=now)
            return True, 0, 0.0
        seen.last_seen = now
        if now - seen.last_emitted >= self.every_s:
            suppressed, seen.suppressed, seen.last_emitted = seen.suppressed, 0, now
            return True, suppressed, now - seen.first
        seen.suppressed += 1
        return False, seen.suppressed, now - seen.first

    def _forget(self, now: float) -> None:
        for key in [k for k, s in self._seen.items() if now - s.last_seen >= self.every_s]:
            del self._seen[key]
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
