"""gunicorn hooks, one job each. The worker's runtime hangs off ``worker.app`` (our
application object), created in ``load()`` after fork."""

from __future__ import annotations

import logging
import socket

from redis.exceptions import RedisError

from esb.observe import metrics
from esb.observe.blocking import log_abort_stack

logger = logging.getLogger(__name__)


def post_worker_init(worker) -> None:
    """Build the worker's state from the ODB and Redis. Never raises: an exception here
    would halt the whole server, and a backing service being down is not a reason to."""
    try:
        worker.app.runtime.start()
    except Exception:
        logger.exception("worker %d: start failed; it serves what it has and keeps retrying", worker.pid)


def worker_abort(worker) -> None:
    """WORKER TIMEOUT: the arbiter is about to kill this worker; name what held the loop."""
    log_abort_stack()


def worker_exit(server, worker) -> None:
    """Graceful exit: stop taking dispatched work and drop our heartbeat at once."""
    runtime = getattr(worker.app, "runtime", None)
    if runtime is not None:
        runtime.stop()


def child_exit(server, worker) -> None:
    """In the arbiter: a worker died, however. Remove its heartbeat so status drops it now
    instead of when the key expires, and its live gauge from the metrics (its counts stay)."""
    try:
        metrics.process_dead(worker.pid)
    except OSError as exc:
        logger.warning("worker %d exited; could not remove its live metrics (%s)", worker.pid, exc)
    try:
        client = server.app.arbiter_redis()
        client.delete(server.app.keys.worker_heartbeat(socket.gethostname(), worker.pid))
    except RedisError as exc:
        logger.warning("worker %d exited; could not clear its heartbeat (%s)", worker.pid, exc)
    logger.info("worker %d exited; the arbiter replaces it", worker.pid)
