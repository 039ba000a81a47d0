"""Lua scripts sent whole with EVAL, on a client or queued on a pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis


class LuaScript:
    """Called like redis-py's registered scripts: ``script(keys=[...], args=[...], client=pipe)``.

    PERF(esb): a pipeline holding registered scripts asks SCRIPT EXISTS before each execute,
    one more round trip for every batch of firings. Redis keeps an EVAL'd script compiled
    under its digest, so sending the text costs only its bytes, and a Redis that restarted
    and forgot its scripts needs no NOSCRIPT recovery.
    """

    def __init__(self, client: redis.Redis, source: str):
        self.client = client
        self.source = source

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        return (client or self.client).eval(self.source, len(keys), *keys, *args)
