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
import time
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
    parse_iso,
    utc_now_iso,
)
from esb.config import Definitions, ServerConfig, merge_units
from esb.errors import ConfigError, OdbUnavailable, ServiceNotFound
from esb.observe import metrics
from esb.observe.blocking import start_block_monitor
from esb.observe.outage import OutageNotice
from esb.observe.status import collect_status
from esb.odb import MODULE, UNIT, OdbStore
from esb.outgoing import amqp as outgoing_amqp
from esb.outgoing.amqp.consumer import AmqpChannel, channels_field, refresh_channels
from esb.scheduler.records import job_finished
from esb.server.consumer import DispatchConsumer, consumer_name
from esb.server.http import compile_channels, make_app
from esb.service import JobInfo, ServiceRuntime, ServiceStore

logger = logging.getLogger(__name__)

ODB_POLL_S = 5.0
POOL_SIZE = 64  # Redis connections of one worker
METRICS_FLUSH_S = 1.0  # how often counts go from memory to prometheus_client


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
        app, self.sink = make_app(
            config, self.services, collect_status=self.status, render_metrics=self.render_metrics
        )
        self.app = metrics.counting(app)
        self.publisher: metrics.Publisher | None = None
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
        )
        self._greenlets: list[gevent.Greenlet] = []
        self.amqp_channels: dict[str, AmqpChannel] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.reload()
        except (OdbUnavailable, RedisError) as exc:
            logger.error("worker %d could not load its state (%s); retrying in the background", self.pid, exc)
        start_block_monitor(self.config.observe.block_warn_s)
        try:
            self.publisher = metrics.Publisher()
        except (RuntimeError, OSError) as exc:
            logger.error("worker %d publishes no metrics: %s", self.pid, exc)
        # In the background: a Redis that does not answer must not hold up the start.
        gevent.spawn(self._open_connections)
        self._greenlets = [
            gevent.spawn(self.heartbeat.run_forever),
            gevent.spawn(self.watch_deploys),
            gevent.spawn(self.poll_odb),
            gevent.spawn(self.publish_metrics),
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
        # AMQP channels finish the messages they hold while the dispatch consumer does the same.
        channel_stops = [
            gevent.spawn(channel.stop, self.config.main.graceful_timeout_s / 2)
            for channel in self.amqp_channels.values()
        ]
        self.consumer.stop(timeout_s=self.config.main.graceful_timeout_s / 2)
        gevent.joinall(channel_stops, timeout=self.config.main.graceful_timeout_s / 2)
        gevent.killall(self._greenlets, block=True, timeout=2)
        self.flush_metrics()  # what was counted since the last flush, the stop's runs included
        self.heartbeat.stop()
        for outconn in self.services.outgoing.amqp.values():
            outconn.retire()

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
            outgoing = self.services.outgoing
            outgoing.amqp = outgoing_amqp.refresh(outgoing.amqp, definitions.of("outconn.amqp"))
            self.amqp_channels = refresh_channels(
                self.amqp_channels,
                definitions,
                self.services,
                stop_timeout_s=self.config.main.graceful_timeout_s / 2,
            )
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

    # -- metrics -------------------------------------------------------------------------

    def publish_metrics(self) -> None:
        while True:
            gevent.sleep(METRICS_FLUSH_S)
            self.flush_metrics()

    def flush_metrics(self) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.flush()
        except Exception:
            # An mmap write can fail (a full disk); the counts taken are lost, not the loop.
            logger.exception("worker %d: metrics of the last %.0f s dropped", self.pid, METRICS_FLUSH_S)

    def render_metrics(self) -> bytes:
        """/metrics: this worker's own counts flushed first, so a scrape sees them at once."""
        self.flush_metrics()
        return metrics.render()

    # -- dispatched work -----------------------------------------------------------------

    def run_dispatched(self, message: DispatchMessage) -> str | None:
        """Run one stream message; a failing service is logged and counted, never retried.

        Answers the error that ended the run, or None.
        """
        job = JobInfo(**message.job) if message.job else None
        self._observe_delays(message, job)
        try:
            self.services.invoke(message.service, message.payload, cid=message.cid, job=job)
        except ServiceNotFound as exc:
            metrics.dispatch_runs["error"] += 1
            logger.error("dispatched message %s dropped: %s", message.msg_id, exc, extra={"cid": message.cid})
            return str(exc)
        except Exception as exc:
            metrics.dispatch_runs["error"] += 1
            logger.exception(
                "service %s failed on dispatched message %s",
                message.service,
                message.msg_id,
                extra={"cid": message.cid, "service": message.service},
            )
            return f"{type(exc).__name__}: {exc}"
        metrics.dispatch_runs["ok"] += 1
        return None

    @staticmethod
    def _observe_delays(message: DispatchMessage, job: JobInfo | None) -> None:
        """Enqueueing to now, and for a firing its due time to now (clocks of other hosts
        may run ahead: a negative delay counts as none)."""
        now = time.time()
        if message.enqueued_at:
            metrics.observe_dispatch_delay(max(now - message.enqueued_at, 0.0))
        if job is not None:
            try:
                due = parse_iso(job.scheduled_at)
            except ValueError:
                due = None
            if due is not None:
                metrics.observe_firing_delay(max(now - due.timestamp(), 0.0))

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
            **outgoing_amqp.heartbeat_field(self.services.outgoing.amqp),
            **channels_field(self.amqp_channels),
        }

    def status(self) -> dict[str, Any]:
        return collect_status(self.redis, self.keys, self.config, self.definitions)


__all__ = ["WorkerRuntime"]
