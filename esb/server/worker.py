"""Everything one gevent worker holds, rebuilt from the ODB and Redis whenever it starts.

Nothing here lives only in this worker: services, channels and security come from the
ODB; dispatched work sits in the Redis stream until acknowledged. A worker that is
killed and replaced loses nothing but the requests it was serving.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import traceback
from typing import Any

import gevent
from redis.client import Pipeline
from redis.exceptions import RedisError

from esb.bus import (
    DispatchMessage,
    Heartbeat,
    Keys,
    make_blocking_reader,
    make_redis,
    open_connections,
    utc_now_iso,
)
from esb.config import Definitions, ServerConfig, merge_units
from esb.errors import ConfigError, OdbUnavailable, ServiceNotFound
from esb.observe import metrics
from esb.observe.blocking import start_block_monitor
from esb.observe.outage import OutageNotice
from esb.observe.status import collect_status
from esb.odb import MODULE, UNIT, OdbStore
from esb.scheduler.records import job_finished
from esb.server.consumer import DispatchConsumer, consumer_name
from esb.server.http import compile_channels, make_app
from esb.service import JobInfo, ServiceRuntime, ServiceStore

logger = logging.getLogger(__name__)

ODB_POLL_S = 5.0
TRACEBACK_FRAMES = 20
TRACEBACK_CHARS = 8000
POOL_SIZE = 64  # Redis connections of one worker


class WorkerRuntime:
    """Built in the worker after fork (``gunicorn load()``), started in ``post_worker_init``.

    ``__init__`` opens no socket; ``start()`` loads state once and spawns the background
    greenlets; ``stop()`` ends them gracefully.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.keys = Keys(config.main.cluster)
        self.redis = make_redis(
            config.redis_url, socket_timeout_s=config.redis.socket_timeout_s, max_connections=POOL_SIZE
        )
        self.odb = OdbStore(config.odb_url)
        self.store = ServiceStore()
        self.services = ServiceRuntime(
            self.store, self.redis, self.keys, max_backlog=config.dispatch.max_backlog
        )
        self.definitions = Definitions(objects={}, unit_of={})
        self.generation = -1
        self.started_at = utc_now_iso()
        self.app, self.sink = make_app(
            config,
            self.services,
            collect_status=self.status,
            render_metrics=lambda: metrics.render(self.redis, self.keys),
        )
        self.heartbeat = Heartbeat(
            self.redis,
            self.keys.worker_heartbeat(self.host, self.pid),
            self._heartbeat_fields,
            interval_s=config.observe.heartbeat_interval_s,
            ttl_s=config.observe.stale_after_s,
        )
        self.consumer = DispatchConsumer(
            client=self.redis,
            reader=make_blocking_reader(config.redis_url, block_s=1.0),
            keys=self.keys,
            consumer_name=consumer_name(self.host, self.pid),
            settings=config.dispatch,
            run=self.run_dispatched,
            record=self.record_run,
            redis_url=config.redis_url,
        )
        # Set by the worker_abort hook: the SystemExit gunicorn raises to end a worker past
        # its timeout may surface inside a service's greenlet and must not be caught there.
        self.is_aborting = False
        self._greenlets: list[gevent.Greenlet] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.reload()
        except (OdbUnavailable, RedisError) as exc:
            logger.error("worker %d could not load its state (%s); retrying in the background", self.pid, exc)
        start_block_monitor(self.config.observe.block_warn_s)
        # In the background: a Redis that does not answer must not hold up the start.
        gevent.spawn(self._open_connections)
        self._greenlets = [
            gevent.spawn(self.heartbeat.run_forever),
            gevent.spawn(self.watch_deploys),
            gevent.spawn(self.poll_odb),
        ]
        self.consumer.start()
        # PERF(esb): a full collection walked every module, class and definition the worker
        # holds, about 80 ms with the worker still; what start() built lives as long as the
        # worker, so collections skip it from here on.
        gc.freeze()
        logger.info(
            "worker %d ready: generation %d, %d services, %d channels",
            self.pid,
            self.generation,
            len(self.store.services),
            len(self.sink.table),
        )

    def _open_connections(self) -> None:
        """Half the pool, ahead of the first burst of work; the rest stays free for
        whatever else holds a connection."""
        try:
            open_connections(self.redis, min(self.config.dispatch.concurrency, POOL_SIZE // 2))
        except RedisError as exc:
            logger.warning("worker %d opens its Redis connections on first use (%s)", self.pid, exc)

    def stop(self) -> None:
        self.consumer.stop(timeout_s=self.config.main.graceful_timeout / 2)
        gevent.killall(self._greenlets, block=True, timeout=2)
        self.heartbeat.stop()

    # -- state -------------------------------------------------------------------------

    def reload(self) -> None:
        """Rebuild services, channels and security from the ODB if its generation moved."""
        generation = self.odb.generation()
        if generation == self.generation:
            return
        modules = self.odb.current(MODULE)
        units = self.odb.current(UNIT)
        self.store.rebuild([(m.name, m.version, m.content) for m in modules])
        try:
            definitions = merge_units([(u.name, u.content) for u in units])
        except ConfigError as exc:
            logger.error(
                "definitions of generation %d rejected here (%s); the previous ones keep serving",
                generation,
                exc,
            )
        else:
            self.definitions = definitions
            self.sink.table = compile_channels(definitions)
        self.generation = generation
        logger.info("worker %d now at generation %d", self.pid, generation)

    def watch_deploys(self) -> None:
        """Reload when a deploy is announced; resubscribe after a Redis outage."""
        outage = OutageNotice(logger, "subscription to deploy notices")
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.deploy_channel)
                outage.succeeded()
                # A deploy announced while we were not subscribed is caught by this reload.
                self._reload_logged()
                for _message in pubsub.listen():
                    self._reload_logged()
            except RedisError as exc:
                outage.failed(exc, 1.0)
                gevent.sleep(1.0)
            finally:
                pubsub.close()

    def poll_odb(self) -> None:
        """The safety net under pub/sub: a missed notice costs at most ODB_POLL_S."""
        while True:
            gevent.sleep(ODB_POLL_S)
            self._reload_logged()

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except OdbUnavailable as exc:
            logger.warning("ODB unavailable (%s); keeping generation %d", exc, self.generation)

    # -- dispatched work -----------------------------------------------------------------

    def run_dispatched(self, message: DispatchMessage) -> str | None:
        """Run one stream message; a failing service is logged and counted, never retried.

        Whatever the service raises, BaseException included (SystemExit, KeyboardInterrupt),
        ends this run only: the message is finished as a failed run with its error. User code
        never chooses the worker's fate; left alone, gevent would hand a SystemExit to the
        main greenlet and the worker would exit with the user's code (3 halts gunicorn).
        Answers the error that ended the run, or None.
        """
        job = JobInfo(**message.job) if message.job else None
        try:
            self.services.invoke(message.service, message.payload, cid=message.cid, job=job)
        except ServiceNotFound as exc:
            metrics.dispatch_runs["error"] += 1
            logger.error("dispatched message %s dropped: %s", message.msg_id, exc, extra={"cid": message.cid})
            return str(exc)
        except BaseException as exc:
            if self.is_aborting:
                raise  # gunicorn ends this worker (WORKER TIMEOUT): let it
            metrics.dispatch_runs["error"] += 1
            error = f"{type(exc).__name__}: {exc}"
            logger.error(
                "service %s failed on dispatched message %s (%s); the run is recorded as failed\n%s",
                message.service,
                message.msg_id,
                error,
                bounded_traceback(exc),
                extra={"cid": message.cid, "service": message.service},
            )
            return error
        metrics.dispatch_runs["ok"] += 1
        return None

    def record_run(
        self, pipe: Pipeline, message: DispatchMessage, duration_s: float, error: str | None
    ) -> None:
        """A scheduled job's run is recorded in the transaction that acknowledges it."""
        if message.job:
            job, firing = message.job["name"], message.job["firing_id"]
            job_finished(pipe, self.keys, job, firing, duration_s, error)

    # -- facts -------------------------------------------------------------------------

    def _heartbeat_fields(self) -> dict[str, str]:
        return {
            "pid": str(self.pid),
            "host": self.host,
            "server": str(self.config.directory),
            "started_at": self.started_at,
            "generation": str(self.generation),
            "inflight": str(len(self.consumer.inflight)),
            "metrics": metrics.snapshot(),
        }

    def status(self) -> dict[str, Any]:
        return collect_status(self.redis, self.keys, self.config, self.definitions)


def bounded_traceback(exc: BaseException) -> str:
    """The innermost TRACEBACK_FRAMES frames, at most TRACEBACK_CHARS characters: a deep
    recursion in a service must cost the log a few lines, not thousands."""
    text = "".join(traceback.format_exception(exc, limit=-TRACEBACK_FRAMES)).rstrip()
    if len(text) > TRACEBACK_CHARS:
        text = "...\n" + text[-TRACEBACK_CHARS:]
    return text


__all__ = ["WorkerRuntime", "bounded_traceback"]
