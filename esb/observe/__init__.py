"""Observability: logging, run context, the retry policy, metrics, status, the loop-block monitor.

Only the low-level pieces are exported here; ``esb.observe.status`` reads Redis through
``esb.bus``, and ``esb.observe.metrics`` is imported by path.
"""

from esb.observe.context import ContextFilter, current_call, running_calls
from esb.observe.logs import setup_logging
from esb.observe.retry import Retrying, RetryPolicy, ensure

__all__ = [
    "ContextFilter",
    "RetryPolicy",
    "Retrying",
    "current_call",
    "ensure",
    "running_calls",
    "setup_logging",
]
