"""Observability, the bottom layer: logging, run context, the retry policy, metrics, the
launcher's supervision facts and the loop-block monitor.

It imports nothing of esb's but ``esb.errors``, so every other package may use it;
``esb.status``, one layer up, turns these facts and Redis's into a verdict.
``esb.observe.metrics`` is imported by path: prometheus_client picks its mode when first
imported.
"""

from esb.observe.context import ContextFilter
from esb.observe.logs import setup_logging
from esb.observe.retry import Retrying, RetryPolicy, ensure

__all__ = [
    "ContextFilter",
    "RetryPolicy",
    "Retrying",
    "ensure",
    "setup_logging",
]
