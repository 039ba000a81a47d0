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
from typing import Any

import gevent
import gevent.lock
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
from esb.deploy.generations import LoadingMarker, advance_last_good, claim_crashes
from esb.errors import ConfigError, DeployError, OdbUnavailable, ServiceNotFound
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
        # The generation this worker applied, and why it could not apply a newer one.
        self.generation = -1
        self.generation_error = ""
        self._failed_generation: int | None = None
        self._reload_lock = gevent.lock.Semaphore()
        self.marker = LoadingMarker(config.run_dir, self.pid)
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
        )
        self._greenlets: list[gevent.Greenlet] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        try:
            # Workers that died importing a module left markers: count them, roll back a
            # version that keeps killing workers, then load.
            claim_crashes(self.config.run_dir, self.odb, host=self.host)
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
        self.consumer.stop(timeout_s=self.config.main.graceful_timeout_s / 2)
        gevent.killall(self._greenlets, block=True, timeout=2)
        self.heartbeat.stop()

    # -- state -------------------------------------------------------------------------

    def reload(self) -> None:
        """Apply the ODB's generation if it moved; one that does not apply here leaves this
        worker on what it had (at start: the last good generation) and says so."""
        with self._reload_lock:
            target = self.odb.generation()
            if target in (self.generation, self._failed_generation):
                return
            try:
                self._apply(target, strict=True)
            except (ConfigError, DeployError) as exc:
                self._failed_generation = target
                self.generation_error = f"generation {target}: {exc}"
                logger.error(
                    "worker %d cannot apply generation %d (%s); %s",
                    self.pid,
                    target,
                    exc,
                    f"it keeps serving generation {self.generation}"
                    if self.generation >= 0
                    else "it starts from the last good generation",
                )
                if self.generation < 0:
                    self._apply_fallback(target)
                return
            self._failed_generation = None
            self.generation_error = ""

    def _apply_fallback(self, target: int) -> None:
        """At start, when the newest generation does not apply: the last good one, else
        whatever of the newest loads (a server upgraded from before last good was kept)."""
        good = self.odb.last_good()
        if 0 < good < target:
            try:
                self._apply(good, strict=True)
                return
            except (ConfigError, DeployError) as exc:
                logger.error(
                    "worker %d cannot apply the last good generation %d either (%s)", self.pid, good, exc
                )
            self._apply(good, strict=False)
        else:
            self._apply(target, strict=False)

    def _apply(self, generation: int, *, strict: bool) -> None:
        """Build services, channels and security of GENERATION, then swap them in whole.

        STRICT: any module or definition that fails raises and nothing is swapped.
        """
        modules = self.odb.current(MODULE, at=generation)
        units = self.odb.current(UNIT, at=generation)
        definitions = self.definitions
        try:
            definitions = merge_units([(u.name, u.content) for u in units])
        except ConfigError as exc:
            if strict:
                raise
            logger.error(
                "definitions of generation %d rejected here (%s); the previous ones serve", generation, exc
            )
        deployment_of = {m.name: m.deployment_id for m in modules}
        try:
            state = self.store.load(
                [(m.name, m.version, m.content) for m in modules],
                strict=strict,
                before_import=lambda name, version: self.marker.loading(
                    generation, deployment_of[name], name, version
                ),
            )
        finally:
            self.marker.clear()
        self.store.install(state)
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
            try:
                advance_last_good(self.odb, self.redis, self.keys, self.config.observe.stale_after_s)
            except (OdbUnavailable, RedisError) as exc:
                logger.debug("last good generation not checked (%s)", exc)

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except OdbUnavailable as exc:
            logger.warning("ODB unavailable (%s); keeping generation %d", exc, self.generation)

    # -- dispatched work -----------------------------------------------------------------

    def run_dispatched(self, message: DispatchMessage) -> str | None:
        """Run one stream message; a failing service is logged and counted, never retried.

        Answers the error that ended the run, or None.
        """
        job = JobInfo(**message.job) if message.job else None
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
            "generation_error": self.generation_error,
            "inflight": str(len(self.consumer.inflight)),
            "metrics": metrics.snapshot(),
        }

    def status(self) -> dict[str, Any]:
        return collect_status(self.redis, self.keys, self.config, self.definitions)


__all__ = ["WorkerRuntime"]
