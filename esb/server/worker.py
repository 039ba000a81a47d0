"""Everything one gevent worker holds, rebuilt from the ODB and Redis whenever it starts.

Nothing here lives only in this worker: services, channels and security come from the
ODB; dispatched work sits in the Redis stream until acknowledged. A worker that is
killed and replaced loses nothing but the requests it was serving.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import gevent
import gevent.lock
from gevent.timeout import Timeout
from redis.client import Pipeline
from redis.exceptions import RedisError

from esb.bus import (
    DeployNotices,
    DispatchMessage,
    Heartbeat,
    Keys,
    heartbeat_client,
    make_blocking_reader,
    make_redis,
    open_connections,
    parse_iso,
    utc_now_iso,
)
from esb.bus.jobstate import record_run
from esb.config import Definitions, ServerConfig, merge_units
from esb.deploy.generations import LoadingMarker, advance_last_good, claim_crashes
from esb.deploy.stored import merge_what_resolves
from esb.errors import (
    BadInput,
    ConfigError,
    DeployError,
    OdbUnavailable,
    ServiceFailed,
    ServiceNotFound,
    Unavailable,
)
from esb.notification import NOTIFICATION_SERVICE
from esb.notification.runner import NotificationRunner
from esb.notification.store import NotificationStore
from esb.observe import metrics
from esb.observe.blocking import start_block_monitor
from esb.observe.retry import BACKING_SERVICE, Retrying
from esb.odb import MODULE, UNIT, OdbStore
from esb.outgoing import amqp as outgoing_amqp
from esb.outgoing import sql as outgoing_sql
from esb.outgoing.amqp import channels_field, refresh_channels
from esb.server.consumer import DispatchConsumer, consumer_name
from esb.server.http import compile_channels, make_app
from esb.service import JobInfo, ServiceRuntime, ServiceStore
from esb.status import collect_status

if TYPE_CHECKING:
    from esb.outgoing.amqp.consumer import AmqpChannel

logger = logging.getLogger(__name__)

ODB_POLL_S = 5.0
POOL_SIZE = 64  # Redis connections of one worker's services
LOOP_POOL_SIZE = 16  # Redis connections of its loops: dispatch consumer, deploy notices, status
SERVICE_RETRIES = 3  # a service's call survives a quick Redis restart; the loops retry themselves
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
            config.redis_url,
            socket_timeout_s=config.redis.socket_timeout_s,
            max_connections=POOL_SIZE,
            retries=SERVICE_RETRIES,
        )
        # The loops below retry by themselves (esb.observe.retry): their client fails fast.
        self.loop_redis = make_redis(
            config.redis_url, socket_timeout_s=config.redis.socket_timeout_s, max_connections=LOOP_POOL_SIZE
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
        # Why the last build of a generation failed for a reason other than the generation
        # itself (a file under run/ not writable, a full disk, the ODB away); "" once it built.
        self.build_error = ""
        self._build_failures = 0
        # Units of the applied generation left out because they do not resolve here (an
        # environment variable unset in this worker): "unit: reason" each.
        self.left_out_units: list[str] = []
        self._reload_lock = gevent.lock.Semaphore()
        self.marker = LoadingMarker(config.run_dir, self.pid)
        self.started_at = utc_now_iso()
        app, self.sink = make_app(
            config, self.services, collect_status=self.status, render_metrics=self.render_metrics
        )
        self.app = metrics.counting(app)
        self.publisher: metrics.Publisher | None = None
        observe = config.observe
        self.heartbeat = Heartbeat(
            heartbeat_client(
                config.redis_url, interval_s=observe.heartbeat_interval_s, ttl_s=observe.stale_after_s
            ),
            self.keys.worker_heartbeat(self.host, self.pid),
            self._heartbeat_fields,
            interval_s=config.observe.heartbeat_interval_s,
            ttl_s=config.observe.stale_after_s,
        )
        self.consumer = DispatchConsumer(
            client=self.loop_redis,
            reader=make_blocking_reader(config.redis_url, block_s=1.0),
            keys=self.keys,
            consumer_name=consumer_name(self.host, self.pid),
            settings=config.dispatch,
            run=self.run_dispatched,
            record=self.record_run,
            redis_url=config.redis_url,
            counts_own_attempts=self.counts_own_attempts,
        )
        self._greenlets: list[gevent.Greenlet] = []
        self._odb_retrying = Retrying(logger, f"reload of worker {self.pid}", service="ODB")
        self.amqp_channels: dict[str, AmqpChannel] = {}
        self.notifications = NotificationRunner(
            store=NotificationStore(self.odb.engine),
            call=self.services.run,
            outconns=lambda: self.services.outgoing.sql,
            definitions=lambda: self.definitions.of("notification.sql"),
            client=self.loop_redis,
            keys=self.keys,
            host=self.host,
            pid=self.pid,
        )

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """True once this worker built a generation: before, it has no channel to serve."""
        return self.generation >= 0

    def start(self) -> None:
        """Build the generation, then start the loops whatever that gave: a worker that
        could not build keeps beating (saying why) and its ODB poll retries the build."""
        first_poll_s = self._reload_logged()
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
            gevent.spawn(self.poll_odb, first_poll_s),
            gevent.spawn(self.publish_metrics),
            gevent.spawn(self.check_databases),
        ]
        self.consumer.start()
        # PERF(esb): a full collection walked every module, class and definition the worker
        # holds, about 80 ms with the worker still; what start() built lives as long as the
        # worker, so collections skip it from here on.
        gc.freeze()
        if self.is_ready:
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
        for engine in self.services.outgoing.sql.values():
            engine.retire(wait=False)

    # -- state -------------------------------------------------------------------------

    def reload(self) -> None:
        """Apply the ODB's generation if it moved; one that does not apply here leaves this
        worker on what it had (at start: the last good generation) and says so.

        Any other error (the ODB away, a file under run/ that cannot be written) is
        raised: the generation may well apply once it is gone, so the caller retries.
        """
        with self._reload_lock:
            if not self.is_ready:
                # Workers that died importing a module left markers: count them, roll back
                # a version that keeps killing workers, then load.
                claim_crashes(self.config.run_dir, self.odb, host=self.host)
            target = self.odb.generation()
            # A generation that failed here is not tried again while an older one serves;
            # a worker with none yet tries until it has one.
            if target == self.generation or (self.is_ready and target == self._failed_generation):
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
        unit_texts = [(u.name, u.content) for u in units]
        try:
            # The ODB holds only units that passed every check on deploy, and a worker
            # builds no trigger: skipping that check keeps APScheduler out of workers.
            definitions, left_out = merge_units(unit_texts, check_triggers=False), []
        except ConfigError as exc:
            if strict:
                raise
            definitions, errors = merge_what_resolves(unit_texts)
            left_out = [str(error) for error in errors]
            logger.error(
                "definitions of generation %d do not all apply here (%s); it serves them without %s",
                generation,
                exc,
                ", ".join(error.file for error in errors),
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
        self.left_out_units = left_out
        self.sink.table = compile_channels(definitions)
        self.sink.unavailable = None
        outgoing = self.services.outgoing
        outgoing.amqp = outgoing_amqp.refresh(outgoing.amqp, definitions.of("outconn.amqp"))
        outgoing.sql = outgoing_sql.refresh(outgoing.sql, definitions.of("outconn.sql"))
        self.amqp_channels = refresh_channels(
            self.amqp_channels,
            definitions,
            self.services,
            stop_timeout_s=self.config.main.graceful_timeout_s / 2,
        )
        self.generation = generation
        logger.info("worker %d now at generation %d", self.pid, generation)

    def watch_deploys(self) -> None:
        """Reload when a deploy is announced (or may have been, while Redis was away)."""
        notices = DeployNotices(self.loop_redis, self.keys, f"worker {self.pid}")
        try:
            while True:
                if notices.poll(timeout_s=1.0):
                    self._reload_logged()
        finally:
            notices.close()

    def poll_odb(self, first_wait_s: float = ODB_POLL_S) -> None:
        """The safety net under pub/sub: a missed notice costs at most ODB_POLL_S; while the
        ODB is away or a build fails, it is tried again at the retry policy's (shorter)
        intervals."""
        wait_s = first_wait_s
        while True:
            gevent.sleep(wait_s)
            wait_s = self._reload_logged()
            try:
                advance_last_good(self.odb, self.redis, self.keys, self.config.observe.stale_after_s)
            except (OdbUnavailable, RedisError) as exc:
                logger.debug("last good generation not checked (%s)", exc)

    def _reload_logged(self) -> float:
        """Reload; an ODB away is logged once per outage, any other failure once per run of
        failures, and the worker keeps serving its generation (if it has one: until then
        its channels answer 503). Answers the seconds until the ODB poll should look again.
        """
        try:
            self.reload()
        except OdbUnavailable as exc:
            self._build_failed(exc, is_logged=True)
            return min(self._odb_retrying.failed(exc), ODB_POLL_S)
        except Exception as exc:  # whatever it is, the next try may succeed: never give up
            return self._build_failed(exc)
        self._odb_retrying.succeeded()
        if self.build_error:
            logger.info("worker %d built generation %d after %d failed attempts",
                        self.pid, self.generation, self._build_failures)
        self.build_error = ""
        self._build_failures = 0
        return ODB_POLL_S

    def _build_failed(self, exc: Exception, *, is_logged: bool = False) -> float:
        """Record why the build failed, log the first failure of a run, and answer the
        wait before the next try (the backing-service policy: seconds, not minutes)."""
        self.build_error = f"{type(exc).__name__}: {exc}"
        self._build_failures += 1
        if not self.is_ready:
            self.sink.unavailable = f"worker {self.pid} has not built its generation yet ({self.build_error})"
        if self._build_failures == 1 and not is_logged:
            logger.exception(
                "worker %d could not build the ODB's generation; %s; retrying",
                self.pid,
                f"it keeps serving generation {self.generation}"
                if self.is_ready
                else "until it can, its channels answer 503",
            )
        return BACKING_SERVICE.interval_s(self._build_failures)

    def check_databases(self) -> None:
        """Ping the databases services use, for status: off every request's path."""
        while True:
            gevent.sleep(outgoing_sql.PING_S)
            try:
                outgoing_sql.check_all(self.services.outgoing.sql)
            except Exception:
                logger.exception("worker %d: database check failed", self.pid)

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

    def counts_own_attempts(self, message: DispatchMessage) -> bool:
        """A notification's firing whose batches have max_attempts: the runner counts every
        attempt, a killed worker's too, and dead-letters the batch itself."""
        if message.service != NOTIFICATION_SERVICE:
            return False
        name = str((message.payload or {}).get("notification", ""))
        definition = self.definitions.of("notification.sql").get(name)
        return definition is not None and definition.max_attempts is not None

    def run_dispatched(self, message: DispatchMessage) -> str | None:
        """Run one stream message; a failing service is logged and counted, never retried.

        Whatever the service raises, BaseException included (SystemExit, KeyboardInterrupt),
        ends this run only: the message is finished as a failed run with its error. User code
        never chooses the worker's fate; left alone, gevent would hand a SystemExit to the
        main greenlet and the worker would exit with the user's code (3 halts gunicorn).
        Answers the error that ended the run, or None.
        """
        job = JobInfo(**message.job) if message.job else None
        self._observe_delays(message, job)
        if message.service == NOTIFICATION_SERVICE and job is not None:
            # An SQL notification's firing: the runner records its own outcome.
            return self.notifications.run(str((message.payload or {}).get("notification", "")))
        try:
            self._run_deployed(message, job)
        except ServiceFailed as exc:  # already logged once, with the service and the cid
            metrics.dispatch_runs["error"] += 1
            return exc.error
        except (ServiceNotFound, BadInput, Unavailable, Timeout) as exc:
            # Not deployed here, the payload refused, a backing service down, or a timeout
            # the service let escape: a failed run all the same, said in one line.
            metrics.dispatch_runs["error"] += 1
            error = f"{type(exc).__name__}: {exc}"
            logger.error(
                "dispatched message %s of service %s failed: %s",
                message.msg_id,
                message.service,
                error,
                extra={"cid": message.cid, "service": message.service},
            )
            return error
        metrics.dispatch_runs["ok"] += 1
        return None

    def _run_deployed(self, message: DispatchMessage, job: JobInfo | None) -> None:
        """Run MESSAGE's service; one this worker does not know yet is looked for in the
        ODB's newest generation before the run counts as failed.

        Why: a message can be taken by a worker a moment before the deploy notice of its
        service reaches it (a job fired from a generation the scheduler read first, an
        invoke_async from a worker that already applied it); without catching up first, the
        message would be finished as failed and its work lost.
        """
        try:
            self.services.run(message.service, message.payload, cid=message.cid, job=job)
        except ServiceNotFound:
            before = self.generation
            self._reload_logged()
            if self.generation == before:
                raise
            self.services.run(message.service, message.payload, cid=message.cid, job=job)

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
            record_run(pipe, self.keys, job, firing, duration_s, error)

    # -- facts -------------------------------------------------------------------------

    def _heartbeat_fields(self) -> dict[str, str]:
        fields = self._facts()
        if not self.is_ready:
            # It loaded nothing yet: its readiness is the problem, not each service it lacks.
            del fields["services"]
        return fields

    def _facts(self) -> dict[str, str]:
        return {
            "pid": str(self.pid),
            "host": self.host,
            "server": str(self.config.directory),
            "started_at": self.started_at,
            "generation": str(self.generation),
            "generation_error": self.generation_error,
            # Not ready: no generation built yet, its channels answer 503 (BUILD_ERROR says why).
            "ready": "1" if self.is_ready else "0",
            "build_error": self.build_error,
            "left_out_units": json.dumps(self.left_out_units),
            # What this worker can run: status checks each channel's and job's service here.
            "services": json.dumps(sorted(self.store.services)),
            "inflight": str(len(self.consumer.inflight)),
            **outgoing_amqp.heartbeat_field(self.services.outgoing.amqp),
            **outgoing_sql.heartbeat_field(self.services.outgoing.sql),
            **channels_field(self.amqp_channels),
        }

    def status(self) -> dict[str, Any]:
        return collect_status(self.loop_redis, self.keys, self.config, self.definitions, self.odb)


__all__ = ["WorkerRuntime"]
