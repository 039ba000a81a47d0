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

from esb.observe.calls import running_calls
from esb.observe.repeats import Repeats

logger = logging.getLogger(__name__)

# A loop blocked for long is reported every monitoring period (about block_warn_s); past
# the first warning, one line per REPEAT_S says it still is, with the count left out.
REPEAT_S = 30.0
STACK_LINES = 60


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
    repeats = Repeats(REPEAT_S)  # used by the monitoring thread only

    def on_event(event: object) -> None:
        if not isinstance(event, gevent.events.EventLoopBlocked):
            return
        call = running_calls.of(event.greenlet)
        who = f"service {call.service} (cid {call.cid})" if call else "code outside any service"
        should_write, suppressed, held_s = repeats.check((id(event.greenlet), call))
        if not should_write:
            return
        if held_s > 0:
            line = (
                f"WARNING [{pid}] esb.observe.blocking: {who} still holds the event loop of "
                f"worker {pid}, for about {held_s + event.blocking_time:.0f} s now "
                f"({suppressed} similar warnings suppressed).\n"
            )
        else:
            lines = [line if line.endswith("\n") else line + "\n" for line in event.info]
            if len(lines) > STACK_LINES:
                lines = [*lines[: STACK_LINES // 2], f"[... {len(lines) - STACK_LINES} lines cut ...]\n",
                         *lines[-STACK_LINES // 2 :]]
            line = (
                f"WARNING [{pid}] esb.observe.blocking: {who} has held the event loop of worker "
                f"{pid} for over {event.blocking_time:.1f} s; every other request of this worker "
                f"waits. Run CPU-heavy work off the loop (see README, 'CPU-heavy services').\n"
                f"{''.join(lines)}"
            )
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        except OSError:
            pass  # nowhere left to say it; the WORKER TIMEOUT hook will still name the service

    # Without monitor_thread, start_periodic_monitoring_thread() quietly does nothing.
    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = threshold_s
    # We write the report ourselves, once per block; gevent's copy went to stderr each period.
    gevent.config.print_blocking_reports = False
    gevent.events.subscribers.append(on_event)
    gevent.get_hub().start_periodic_monitoring_thread()


def log_abort_stack() -> None:
    """Called on WORKER TIMEOUT (SIGABRT): name the services running and the stack that held
    the loop, which is the frame the signal interrupted."""
    calls = running_calls.snapshot()
    current = running_calls.of(gevent.getcurrent())
    stack = "".join(traceback.format_stack(sys._getframe(2), limit=STACK_LINES // 2))
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
