"""gunicorn hooks, one job each. The worker's runtime hangs off ``worker.app`` (our
application object), created in ``load()`` after fork."""

from __future__ import annotations

import logging
import socket
import time

from redis.exceptions import RedisError

from esb.observe import metrics
from esb.observe.blocking import log_abort_stack
from esb.server.arbiter import clear_booted, mark_booted

# Worker deaths older than this are trimmed from Redis when a new one is recorded.
DEATHS_KEPT_S = 3600

logger = logging.getLogger(__name__)


def post_worker_init(worker) -> None:
    """Build the worker's state from the ODB and Redis. Never raises: an exception here
    would halt the whole server, and a backing service being down is not a reason to.

    First the booted marker: from here on the worker's exit code is not a verdict on the
    boot (esb.server.arbiter), whatever the services it loads and runs do."""
    try:
        mark_booted(worker.app.config.run_dir, worker.pid)
    except OSError as exc:
        logger.warning("worker %d: booted marker not written (%s)", worker.pid, exc)
    try:
        worker.app.runtime.start()
    except Exception:
        # start() retries a generation it cannot build by itself; this is a fault of esb's
        # own loops: without its heartbeat, status counts the worker as not live.
        logger.exception("worker %d: start failed; it serves what it has", worker.pid)


def worker_abort(worker) -> None:
    """WORKER TIMEOUT: the arbiter is about to kill this worker; name what held the loop."""
    runtime = getattr(worker.app, "runtime", None)
    if runtime is not None:
        runtime.services.is_aborting = True  # the SystemExit that follows is gunicorn's
    log_abort_stack()


def worker_exit(server, worker) -> None:
    """Graceful exit: stop taking dispatched work and drop our heartbeat at once."""
    runtime = getattr(worker.app, "runtime", None)
    if runtime is not None:
        runtime.stop()


def child_exit(server, worker) -> None:
    """In the arbiter: a worker died, however. Remove its heartbeat so status drops it now
    instead of when the key expires, and its live gauge from the metrics (its counts stay);
    record the death unless the arbiter is stopping: deaths per minute are how status sees
    a crash loop."""
    worker.is_reaped = True  # esb.server.arbiter tells gunicorn's halts apart by it
    clear_booted(server.app.config.run_dir, worker.pid)
    try:
        metrics.process_dead(worker.pid)
    except OSError as exc:
        logger.warning("worker %d exited; could not remove its live metrics (%s)", worker.pid, exc)
    host = socket.gethostname()
    keys = server.app.keys
    try:
        client = server.app.arbiter_redis()
        pipe = client.pipeline(transaction=False)
        pipe.delete(keys.worker_heartbeat(host, worker.pid))
        if not getattr(server, "is_stopping", False):
            now = time.time()
            pipe.zadd(keys.worker_deaths, {f"{host}:{worker.pid}:{now:.3f}": now})
            pipe.zremrangebyscore(keys.worker_deaths, "-inf", now - DEATHS_KEPT_S)
            pipe.expire(keys.worker_deaths, DEATHS_KEPT_S)
        pipe.execute()
    except RedisError as exc:
        logger.warning("worker %d exited; could not clear its heartbeat (%s)", worker.pid, exc)
    logger.info("worker %d exited; the arbiter replaces it", worker.pid)
