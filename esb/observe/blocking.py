"""Naming the service that holds a worker's event loop.

gevent's monitoring thread notices a loop blocked for longer than ``max_blocking_time`` and
emits EventLoopBlocked from that thread; we write the warning straight to the log file's
descriptor, because the loop (and every lock it owns) may be stuck while we do.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import gevent
import gevent.events

from esb.observe.context import running_calls

logger = logging.getLogger(__name__)


def _log_fd() -> int:
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            try:
                return stream.fileno()
            except (OSError, ValueError):
                continue
    return sys.stderr.fileno()


def start_block_monitor(threshold_s: float) -> None:
    """Warn, naming the service and its stack, when one greenlet holds the loop too long."""
    fd = _log_fd()
    pid = os.getpid()

    def on_event(event: object) -> None:
        if not isinstance(event, gevent.events.EventLoopBlocked):
            return
        call = running_calls.of(event.greenlet)
        who = f"service {call.service} (cid {call.cid})" if call else "code outside any service"
        stack = "".join(line if line.endswith("\n") else line + "\n" for line in event.info)
        line = (
            f"WARNING [{pid}] esb.observe.blocking: {who} has held the event loop of worker "
            f"{pid} for over {event.blocking_time:.1f} s; every other request of this worker "
            f"waits. Run CPU-heavy work off the loop (see README, 'CPU-heavy services').\n"
            f"{stack}"
        )
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        except OSError:
            pass  # nowhere left to say it; the WORKER TIMEOUT hook will still name the service

    # Without monitor_thread, start_periodic_monitoring_thread() quietly does nothing.
    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = threshold_s
    gevent.events.subscribers.append(on_event)
    gevent.get_hub().start_periodic_monitoring_thread()


def log_abort_stack() -> None:
    """Called on WORKER TIMEOUT (SIGABRT): name the services running and the stack that held
    the loop, which is the frame the signal interrupted."""
    calls = running_calls.snapshot()
    current = running_calls.of(gevent.getcurrent())
    stack = "".join(traceback.format_stack(sys._getframe(2)))
    if current is not None:
        logger.critical(
            "WORKER TIMEOUT: service %s (cid %s) held the event loop; stack:\n%s",
            current.service,
            current.cid,
            stack,
        )
    else:
        logger.critical("WORKER TIMEOUT: no service was holding the loop; stack:\n%s", stack)
    for call in calls:
        logger.critical(
            "WORKER TIMEOUT: service %s (cid %s) was running when the worker was killed",
            call.service,
            call.cid,
        )
