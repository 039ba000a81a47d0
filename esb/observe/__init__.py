"""Observability: logging, run context, status aggregation, the loop-block monitor."""

from esb.observe.context import ContextFilter, current_call, running_calls
from esb.observe.logs import setup_logging
from esb.observe.status import collect_status

__all__ = ["ContextFilter", "collect_status", "current_call", "running_calls", "setup_logging"]
