"""The scheduler's job store, kept equal to the job definitions in the ODB.

APScheduler's memory job store is rebuilt from the ODB at start and brought up to date
whenever the ODB generation moves (a deploy notice, or the poll under it): jobs are added,
changed, paused, resumed and removed in place, without a restart. Where each job's
schedule continues comes from its state in Redis (see ``state.py``), so every scheduler
of the cluster, and a restarted one, places a job at the same fire times.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import BaseScheduler
from redis.exceptions import RedisError

from esb.config import JobDef, merge_units
from esb.errors import ConfigError
from esb.odb import UNIT, OdbStore
from esb.scheduler.firings import iso
from esb.scheduler.state import Adopted, JobState
from esb.scheduler.triggers import first_fire_time, make_trigger, schedule_signature

logger = logging.getLogger(__name__)

UTC = dt.UTC
EXECUTOR = "redis"


def _dispatch_only(job: JobDef) -> None:
    """The callable APScheduler holds for every job; the executor never calls it."""
    raise RuntimeError(f"job {job.name} must be dispatched, not run in the scheduler")


class JobRegistry:
    """Owns which jobs the scheduler holds. Called from the scheduler's main loop only, except
    ``finish`` which the dispatcher thread calls (APScheduler's own locks make that safe)."""

    def __init__(
        self,
        scheduler: BaseScheduler,
        odb: OdbStore,
        state: JobState,
        recent: Mapping[str, dt.datetime] | None = None,
    ):
        self.scheduler = scheduler
        self.odb = odb
        self.state = state
        self.generation = -1
        self.jobs: dict[str, JobDef] = {}
        self.signatures: dict[str, str] = {}
        # What this process last learned of each schedule: seeds Redis if it lost the state.
        self.known: dict[str, Adopted] = {}
        # Scheduled time of the newest firing this process dispatched, per job (dispatcher's).
        self.recent = recent if recent is not None else {}

    # -- from the ODB ------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> bool:
        """Bring the job store up to the ODB's generation; True when it changed.

        Raises OdbUnavailable or RedisError; the caller retries. Definitions the ODB holds
        but this process rejects are logged and the previous jobs keep firing.
        """
        generation = self.odb.generation()
        if generation == self.generation and not force:
            return False
        units = self.odb.current(UNIT)
        try:
            definitions = merge_units([(u.name, u.content) for u in units])
        except ConfigError as exc:
            logger.error("definitions of generation %d rejected (%s); the previous jobs keep "
                         "firing", generation, exc)
            self.generation = generation
            return False
        self.sync(dict(definitions.jobs), generation)
        return True

    def sync(self, jobs: Mapping[str, JobDef], generation: int) -> None:
        """Make the job store hold exactly JOBS; unchanged jobs are left alone."""
        self.generation = generation
        for name in sorted(set(self.jobs) - set(jobs)):
            self._unschedule(name)
            del self.jobs[name]
            self.signatures.pop(name, None)
            self.known.pop(name, None)
            try:
                self.state.forget(name)
            except RedisError as exc:
                logger.warning("job %s removed; its state in Redis was not cleared (%s)", name, exc)
            logger.info("job %s removed", name, extra={"job": name})
        for name, job in sorted(jobs.items()):
            old = self.jobs.get(name)
            if old == job:
                continue
            self.place(job)
            if old is None:
                logger.info("job %s added (%s, service %s)", name, job.type, job.service,
                            extra={"job": name})
            else:
                logger.info("job %s changed", name, extra={"job": name})
        logger.info("job store at generation %d: %d jobs", generation, len(self.jobs))

    # -- placing jobs ------------------------------------------------------------------

    def place(self, job: JobDef) -> dt.datetime | None:
        """Add or replace JOB in the job store at the fire time its Redis state says.

        Returns the job's next fire time (None: paused, or done for good).
        Raises RedisError; the job is then left as it was.
        """
        now = dt.datetime.now(UTC)
        signature = schedule_signature(job)
        seed = self._seed(job.name) if self.signatures.get(job.name) == signature else None
        adopted = self.state.adopt(job.name, signature, self.generation, now,
                                   is_paused=job.paused, seed=seed)
        self.known[job.name] = adopted
        self.signatures[job.name] = signature
        self.jobs[job.name] = job
        try:
            trigger = make_trigger(job, adopted.defined_at)
        except ValueError as exc:  # validated on deploy; only a bad stored unit gets here
            logger.error("job %s cannot be scheduled (%s); it is not fired", job.name, exc)
            self._unschedule(job.name)
            return None
        next_run = None
        if job.repeats is not None and adopted.dispatched >= job.repeats:
            state = "done: all repeats dispatched"
        elif job.paused:
            state = "paused"
        else:
            next_run = first_fire_time(trigger, now, defined_at=adopted.defined_at,
                                       last_scheduled=adopted.last_scheduled,
                                       resumed_at=adopted.resumed_at)
            state = f"next run {iso(next_run)}" if next_run else "done: no further fire time"
        if next_run is None and not job.paused:
            self._unschedule(job.name)
        else:
            self.scheduler.add_job(
                _dispatch_only, trigger=trigger, args=(job,), id=job.name, name=job.name,
                executor=EXECUTOR, replace_existing=True, next_run_time=next_run,
                # The dispatcher applies these itself, per firing; see executor.py.
                coalesce=False, misfire_grace_time=None, max_instances=1,
            )
        self.state.set_if_active(job.name, next_run=iso(next_run) if next_run else "")
        logger.debug("job %s placed: %s", job.name, state, extra={"job": job.name})
        return next_run

    def _seed(self, name: str) -> Adopted | None:
        known = self.known.get(name)
        recent = self.recent.get(name)
        if known is None or recent is None:
            return known
        if known.last_scheduled is None or recent > known.last_scheduled:
            return dataclasses.replace(known, last_scheduled=recent)
        return known

    def resync(self) -> None:
        """Place every job again from Redis: after taking the lease over, or after Redis was
        unreachable, what fell due meanwhile goes through the misfire policy once.

        Raises RedisError; the caller retries.
        """
        for job in list(self.jobs.values()):
            self.place(job)
        logger.info("job store resynchronised with Redis: %d jobs", len(self.jobs))

    def finish(self, name: str) -> None:
        """A job that dispatched all its repeats leaves the job store."""
        self._unschedule(name)
        try:
            self.state.set_if_active(name, next_run="")
        except RedisError as exc:
            logger.warning("job %s is done; its next_run was not cleared (%s)", name, exc)

    def _unschedule(self, name: str) -> None:
        try:
            self.scheduler.remove_job(name)
        except JobLookupError:
            pass
