"""The scheduler process: APScheduler with a dispatching executor, a lease, a heartbeat.

Threads: APScheduler's own (finds due jobs, hands them to the executor), the dispatcher
(puts firings on the Redis stream), the heartbeat and the deploy-notice listener. The
main thread runs ``SchedulerProcess.run``: signal handlers only record the signal, and
the loop acts on it, renews or takes the lease, keeps the job store equal to the ODB
and serves manual requests. Every Redis or ODB failure is retried with backoff.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from redis.exceptions import RedisError

from esb.bus import Heartbeat, Keys, make_redis, utc_now_iso
from esb.config import ServerConfig
from esb.errors import OdbUnavailable
from esb.odb import OdbStore
from esb.scheduler.commands import Reply, serve_commands
from esb.scheduler.executor import Dispatcher, DispatchExecutor
from esb.scheduler.jobs import EXECUTOR, JobRegistry
from esb.scheduler.lease import Lease
from esb.scheduler.state import JobState

logger = logging.getLogger(__name__)

TICK_S = 0.2
ODB_POLL_S = 2.0
BACKOFF_MAX_S = 5.0


class Backoff:
    """When to try again after consecutive failures: 0.5 s doubling up to BACKOFF_MAX_S."""

    def __init__(self) -> None:
        self.failures = 0
        self.next_try = 0.0  # time.monotonic()

    def ready(self) -> bool:
        return time.monotonic() >= self.next_try

    def failed(self) -> float:
        delay = min(0.5 * 2**self.failures, BACKOFF_MAX_S)
        self.failures += 1
        self.next_try = time.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_try = 0.0


class SchedulerProcess:
    """One scheduler instance; ``run()`` blocks until SIGTERM or SIGINT."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.instance = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.started_at = utc_now_iso()
        self.keys = Keys(config.main.cluster)
        self._signals: list[int] = []
        self._stopping = False
        self._deploy_noticed = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------

    def setup(self) -> None:
        """Build clients and components; opens no connection yet (Redis may be down)."""
        conf = self.config
        self.redis = make_redis(conf.redis_url, socket_timeout_s=conf.redis.socket_timeout_s)
        # The lease gets its own quick client: a slow Redis must not stretch a renewal
        # past the lease's TTL unnoticed.
        lease_timeout_s = max(min(conf.scheduler.lease_ttl_s / 3, 1.0), 0.2)
        self.lease_client = make_redis(conf.redis_url, socket_timeout_s=lease_timeout_s,
                                       max_connections=4, retries=0)
        self.lease = Lease(self.lease_client, self.keys.scheduler_lease, self.instance,
                           ttl_s=conf.scheduler.lease_ttl_s)
        self.odb = OdbStore(conf.odb_url)
        self.state = JobState(self.redis, self.keys, self.instance)
        self.dispatcher = Dispatcher(
            self.state,
            is_active=lambda: self.lease.has_lease,
            default_grace_s=conf.scheduler.misfire_grace_s,
            inflight_ttl_s=conf.scheduler.inflight_ttl_s,
            on_repeats_done=lambda name: self.registry.finish(name),
        )
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            jobstores={"default": MemoryJobStore()},
            executors={EXECUTOR: DispatchExecutor(self.dispatcher)},
        )
        self.registry = JobRegistry(self.scheduler, self.odb, self.state,
                                    recent=self.dispatcher.last_scheduled)
        self.heartbeat = Heartbeat(
            self.redis, self.keys.scheduler_heartbeat(self.host, self.pid), self._heartbeat_fields,
            interval_s=conf.observe.heartbeat_interval_s, ttl_s=conf.observe.stale_after_s,
        )

    def start(self) -> None:
        for target, name in ((self.dispatcher.run_forever, "dispatcher"),
                             (self.heartbeat.run_forever, "heartbeat"),
                             (self.listen_for_deploys, "deploy-notices")):
            thread = threading.Thread(target=target, name=f"esb-scheduler-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.scheduler.start()
        logger.info("scheduler %s started (cluster %s, lease TTL %.1f s, misfire grace %d s)",
                    self.instance, self.config.main.cluster, self.config.scheduler.lease_ttl_s,
                    self.config.scheduler.misfire_grace_s)

    def stop(self) -> None:
        """Stop dispatching, give the lease up at once, leave no heartbeat behind."""
        self._stopping = True
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.dispatcher.stop()
        self.lease.release()
        self.heartbeat.stop()
        for thread in self._threads:
            thread.join(timeout=2)
        self.odb.dispose()
        logger.info("scheduler %s stopped", self.instance)

    # -- signals: handlers record, the loop acts -----------------------------------------

    def install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record_signal)

    def _record_signal(self, signum: int, frame) -> None:
        self._signals.append(signum)

    def handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            logger.info("scheduler %s got %s; stopping", self.instance,
                        signal.Signals(signum).name)
            self._stopping = True

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.install_signals()
        self.start()
        try:
            self.loop()
        finally:
            self.stop()

    def loop(self) -> None:
        was_active = False
        next_lease = 0.0
        next_poll = 0.0
        odb_backoff = Backoff()
        sync_backoff = Backoff()
        loaded = False
        while not self._stopping:
            now = time.monotonic()
            if now >= next_lease:
                self.lease.refresh()
                next_lease = now + self.lease.renew_interval_s
            is_active = self.lease.has_lease
            if self.dispatcher.lost_lease.is_set():
                self.dispatcher.lost_lease.clear()
                self.lease.forfeit()
                is_active = False
            if is_active != was_active:
                self._log_role_change(is_active)
                if is_active:
                    self.dispatcher.needs_resync.set()
                was_active = is_active

            if (self._deploy_noticed.is_set() or now >= next_poll) and odb_backoff.ready():
                self._deploy_noticed.clear()
                next_poll = now + ODB_POLL_S
                try:
                    if self.registry.refresh(force=not loaded):
                        # PERF(esb): a full collection walked every job and stopped all
                        # firings for about 65 ms; the job store lives until the next
                        # deploy, so one collection now spares the ones in between.
                        gc.collect()
                        gc.freeze()
                    loaded = True
                    odb_backoff.succeeded()
                except (OdbUnavailable, RedisError) as exc:
                    delay = odb_backoff.failed()
                    log = logger.warning if odb_backoff.failures == 1 else logger.debug
                    log("job store not refreshed (%s); retrying in %.1f s", exc, delay)

            if loaded and is_active and self.dispatcher.needs_resync.is_set() and sync_backoff.ready():
                self.dispatcher.needs_resync.clear()
                try:
                    self.registry.resync()
                    sync_backoff.succeeded()
                except RedisError as exc:
                    self.dispatcher.needs_resync.set()
                    delay = sync_backoff.failed()
                    logger.warning("resynchronising jobs with Redis failed (%s); retrying in "
                                   "%.1f s", exc, delay)

            if loaded and is_active:
                try:
                    serve_commands(self.redis, self.keys, self.handle_run)
                except RedisError as exc:
                    logger.debug("scheduler commands not read (%s)", exc)
            time.sleep(TICK_S)
            self.handle_signals()

    def _log_role_change(self, is_active: bool) -> None:
        if is_active:
            logger.info("scheduler %s holds the lease: active, dispatching", self.instance)
        else:
            holder = self.lease.holder()
            logger.info("scheduler %s is standby (lease held by %s); keeping its jobs warm",
                        self.instance, holder or "nobody")

    def handle_run(self, name: str) -> Reply:
        """A manual ``run NAME`` request, served by the active scheduler."""
        job = self.registry.jobs.get(name)
        if job is None:
            return Reply("unknown_job", detail=f"no job named {name!r} is defined")
        if not self.lease.has_lease:
            return Reply("standby", detail="this scheduler lost the lease; try again")
        outcome, firing = self.dispatcher.run_now(job)
        if outcome.kind == "dispatched":
            return Reply("dispatched", firing)
        if outcome.kind == "busy":
            return Reply("busy", None, f"the previous run ({outcome.detail}) is still in progress")
        return Reply(outcome.kind, None, outcome.detail)

    def listen_for_deploys(self) -> None:
        """Wake the loop when a deploy is announced; the ODB poll catches what this misses."""
        failing = False
        while not self._stopping:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.deploy_channel)
                if failing:
                    logger.info("deploy notices: subscribed again")
                    failing = False
                while not self._stopping:
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._deploy_noticed.set()
            except RedisError as exc:
                if not failing:
                    logger.warning("deploy notices: Redis unavailable (%s); resubscribing; "
                                   "the ODB poll keeps the jobs current meanwhile", exc)
                    failing = True
                time.sleep(1.0)
            finally:
                pubsub.close()

    def _heartbeat_fields(self) -> dict[str, str]:
        return {
            "instance": self.instance,
            "pid": str(self.pid),
            "host": self.host,
            "active": "true" if self.lease.has_lease else "false",
            "started_at": self.started_at,
            "generation": str(self.registry.generation),
            "jobs": str(len(self.registry.jobs)),
            "dispatched": str(self.dispatcher.dispatched),
        }
