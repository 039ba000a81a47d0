"""The scheduler process: one loop that owns the jobs, in the shape of celery beat.

``SchedulerProcess.tick()`` is the whole of it: renew or take the lease; if active, send
the firings that fell due (``JobTable.pop_due`` -> ``Dispatcher.send``, one pipeline);
read deploy notices and bring the job table up to the ODB; serve manual run requests; and
answer how long to sleep until the next fire time. Nothing else decides anything: the
only other thread is the heartbeat, which reads a few counters. Signal handlers only
record the signal, and the loop acts on it. Every Redis or ODB failure is retried as
``esb.observe.retry.BACKING_SERVICE`` says, logged once per outage.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid

from redis.exceptions import RedisError

from esb.bus import DeployNotices, Heartbeat, Keys, heartbeat_client, make_redis, utc_now_iso
from esb.bus.jobstate import JobState
from esb.config import ServerConfig
from esb.errors import OdbUnavailable
from esb.observe.retry import BACKING_SERVICE, Retrying
from esb.odb import OdbStore
from esb.scheduler.commands import Reply, serve_commands
from esb.scheduler.dispatcher import Dispatcher
from esb.scheduler.jobs import JobTable
from esb.scheduler.lease import Lease

logger = logging.getLogger(__name__)

UTC = dt.UTC
TICK_S = 0.2  # the longest sleep: lease, deploy notices and manual requests are this fresh
WAIT_RETRY_S = 0.1  # how often a firing waiting for the previous run looks again
ODB_POLL_S = 2.0  # the safety net under deploy notices


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
        self._heartbeat_thread: threading.Thread | None = None
        self.is_loaded = False  # the job table was read from the ODB once
        self.is_active = False  # as of the last tick
        self.needs_resync = False  # place every job again from Redis before firing
        self._needs_refresh = True  # read the ODB at the next chance
        self._next_lease = 0.0  # time.monotonic() deadlines
        self._next_poll = 0.0
        self._next_commands = 0.0
        self._next_wait_retry = 0.0

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
        self.state = JobState(self.redis, self.keys, self.instance,
                              inflight_ttl_s=conf.scheduler.inflight_ttl_s)
        self.dispatcher = Dispatcher(self.state, default_grace_s=conf.scheduler.misfire_grace_s)
        self.table = JobTable(self.odb, self.state, recent=self.dispatcher.last_scheduled)
        self.dispatch_retry = Retrying(logger, "dispatch of firings", BACKING_SERVICE)
        self.odb_retry = Retrying(logger, "job table refresh", BACKING_SERVICE, service="ODB")
        self.notices = DeployNotices(self.redis, self.keys, f"scheduler {self.instance}")
        observe = conf.observe
        self.heartbeat = Heartbeat(
            heartbeat_client(conf.redis_url, interval_s=observe.heartbeat_interval_s,
                             ttl_s=observe.stale_after_s),
            self.keys.scheduler_heartbeat(self.host, self.pid), self._heartbeat_fields,
            interval_s=conf.observe.heartbeat_interval_s, ttl_s=conf.observe.stale_after_s,
        )

    def start(self) -> None:
        self._heartbeat_thread = threading.Thread(target=self.heartbeat.run_forever,
                                                  name="esb-scheduler-heartbeat", daemon=True)
        self._heartbeat_thread.start()
        logger.info("scheduler %s started (cluster %s, lease TTL %.1f s, misfire grace %d s)",
                    self.instance, self.config.main.cluster, self.config.scheduler.lease_ttl_s,
                    self.config.scheduler.misfire_grace_s)

    def stop(self) -> None:
        """Stop dispatching, give the lease up at once, leave no heartbeat behind."""
        self._stopping = True
        self.lease.release()
        self.heartbeat.stop()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=2)
        self.notices.close()
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
            while not self._stopping:
                time.sleep(self.tick())
                self.handle_signals()
        finally:
            self.stop()

    def tick(self) -> float:
        """One round of the loop; answers how many seconds to sleep before the next."""
        clock = time.monotonic()
        self._check_lease(clock)
        if self._may_fire():
            self._fire_due(clock)
        self._check_deploys(clock)
        if self.is_active and self.is_loaded and clock >= self._next_commands:
            self._next_commands = clock + TICK_S
            try:
                serve_commands(self.redis, self.keys, self.handle_run)
            except RedisError as exc:
                logger.debug("scheduler commands not read (%s)", exc)
        return self._sleep_s()

    def _may_fire(self) -> bool:
        """Active, with jobs, and placed as Redis says (after a takeover or an outage)."""
        if not (self.is_active and self.is_loaded):
            return False
        if self.needs_resync and self.dispatch_retry.is_due():
            try:
                self.table.resync()
            except RedisError as exc:
                self.dispatch_retry.failed(exc)
            else:
                self.needs_resync = False
                self.dispatch_retry.succeeded()
        return not self.needs_resync

    def _check_lease(self, clock: float) -> None:
        if clock >= self._next_lease:
            self.lease.refresh()
            self._next_lease = clock + self.lease.renew_interval_s
        is_active = self.lease.has_lease
        if is_active == self.is_active:
            return
        self.is_active = is_active
        if is_active:
            logger.info("scheduler %s holds the lease: active, dispatching", self.instance)
            # What fell due while another scheduler (or none) was active is placed again
            # from Redis, and the misfire policy decides what of it still runs.
            self.needs_resync = True
        else:
            holder = self.lease.holder()
            logger.info("scheduler %s is standby (lease held by %s); keeping its jobs warm",
                        self.instance, holder or "nobody")
            self.dispatcher.waiting.clear()

    def _fire_due(self, clock: float) -> None:
        due = self.table.pop_due(dt.datetime.now(UTC))
        if not due and not (self.dispatcher.waiting and clock >= self._next_wait_retry):
            return
        self._next_wait_retry = clock + WAIT_RETRY_S
        try:
            sent = self.dispatcher.send(due)
        except RedisError as exc:
            # The firings popped here are placed again from Redis once it answers, and the
            # misfire policy decides what of them still runs.
            self.dispatch_retry.failed(exc)
            self.needs_resync = True
            return
        self.dispatch_retry.succeeded()
        for name in sent.finished:
            self.table.finish(name)
        if sent.is_lease_lost:
            logger.warning("dispatch refused: this scheduler no longer holds the lease")
            self.lease.forfeit()

    def _check_deploys(self, clock: float) -> None:
        """Read deploy notices; refresh the job table on one, or every ODB_POLL_S."""
        self._read_notices()
        if not (self._needs_refresh or clock >= self._next_poll) or not self.odb_retry.is_due():
            return
        self._needs_refresh = False
        self._next_poll = clock + ODB_POLL_S
        try:
            if self.table.refresh(force=not self.is_loaded):
                # PERF(esb): a full collection walked every job and stopped all firings
                # for about 65 ms; the table lives until the next deploy, so one
                # collection now spares the ones in between.
                gc.collect()
                gc.freeze()
            self.is_loaded = True
            self.odb_retry.succeeded()
        except (OdbUnavailable, RedisError) as exc:
            self._needs_refresh = True
            self.odb_retry.failed(exc, service="ODB" if isinstance(exc, OdbUnavailable) else "Redis")

    def _read_notices(self) -> None:
        if self.notices.poll():
            self._needs_refresh = True

    def _sleep_s(self) -> float:
        if not self._may_sleep_until_due():
            return TICK_S
        limit_s = WAIT_RETRY_S if self.dispatcher.waiting else TICK_S
        soonest = self.table.soonest()
        if soonest is None:
            return limit_s
        return max(0.0, min(limit_s, (soonest - dt.datetime.now(UTC)).total_seconds()))

    def _may_sleep_until_due(self) -> bool:
        return self.is_active and self.is_loaded and not self.needs_resync

    # -- manual runs and facts ---------------------------------------------------------

    def handle_run(self, name: str) -> Reply:
        """A manual ``run NAME`` request, served by the active scheduler."""
        entry = self.table.entries.get(name)
        if entry is None:
            return Reply("unknown_job", detail=f"no job named {name!r} is defined")
        if not self.lease.has_lease:
            return Reply("standby", detail="this scheduler lost the lease; try again")
        outcome, firing = self.dispatcher.run_now(entry.job)
        if outcome.kind == "dispatched":
            return Reply("dispatched", firing)
        if outcome.kind == "busy":
            return Reply("busy", None, f"the previous run ({outcome.detail}) is still in progress")
        return Reply(outcome.kind, None, outcome.detail)

    def _heartbeat_fields(self) -> dict[str, str]:
        """Read by the heartbeat thread: plain values only, nothing it could change."""
        return {
            "instance": self.instance,
            "pid": str(self.pid),
            "host": self.host,
            "active": "true" if self.lease.has_lease else "false",
            "started_at": self.started_at,
            "generation": str(self.table.generation),
            "jobs": str(len(self.table.entries)),
            "dispatched": str(self.dispatcher.dispatched),
        }
