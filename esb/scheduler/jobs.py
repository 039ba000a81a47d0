"""The scheduler's job table: the jobs the ODB defines, each with its trigger and next fire
time, and the heap that orders them by that time (celery beat's shape).

The table is rebuilt from the ODB at start and brought up to date whenever the ODB
generation moves: jobs are added, changed, paused, resumed and removed in place. Where
each job's schedule continues comes from its state in Redis (``esb.bus.jobstate``), so
every scheduler of the cluster, and a restarted one, places a job at the same fire times.
Only the scheduler loop touches the table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from apscheduler.triggers.base import BaseTrigger
from redis.exceptions import RedisError

from esb.bus.jobstate import Adopted, JobState, iso
from esb.config import JobDef, merge_units
from esb.config.schedule import make_trigger, schedule_signature
from esb.errors import ConfigError
from esb.notification import notification_jobs
from esb.odb import UNIT, OdbStore

logger = logging.getLogger(__name__)

UTC = dt.UTC
# The most a new interval job's schedule is shifted past the moment it is defined.
PHASE_MAX_S = 1.0


def phase_s(job: JobDef) -> float:
    """A new interval job's grid starts this long after its definition: a fixed offset from
    its name, under PHASE_MAX_S and under its interval, so that the jobs of one deploy do
    not all fall due in the same millisecond, restart after restart.

    1,000 one-second jobs due at the same instant waited up to 250 ms for their service
    (p99, two workers); spread over a second, 8 ms (bench/README.md, scheduler bench).
    A ``start_date`` is kept to the letter; cron and one-time jobs have their own times.
    """
    if job.type != "interval" or job.start_date:
        return 0.0
    fraction = zlib.crc32(job.name.encode()) / 0xFFFFFFFF
    return fraction * min(PHASE_MAX_S, job.interval_s)


@dataclass
class Entry:
    """One job as the loop fires it; ``next_run`` None: paused, or done for good."""

    job: JobDef
    trigger: BaseTrigger
    next_run: dt.datetime | None


@dataclass(frozen=True)
class Due:
    """The run times of one job that fell due (oldest first) and its next fire time after them."""

    job: JobDef
    run_times: list[dt.datetime]
    next_run: dt.datetime | None


def first_fire_time(
    trigger: BaseTrigger,
    now: dt.datetime,
    *,
    defined_at: dt.datetime,
    last_scheduled: dt.datetime | None,
    resumed_at: dt.datetime | None,
) -> dt.datetime | None:
    """Where a (re)built job's schedule continues; None when it will never fire again.

    After the last firing this cluster handled, the schedule continues with the one after
    it, even when that is in the past: the misfire policy then decides what runs. A job
    that was resumed after a pause continues from the moment of its resumption, so a
    pause is not counted as missed firings.
    """
    if resumed_at is not None and (last_scheduled is None or resumed_at > last_scheduled):
        return trigger.get_next_fire_time(None, max(resumed_at, defined_at))
    if last_scheduled is not None:
        return trigger.get_next_fire_time(last_scheduled, now)
    return trigger.get_next_fire_time(None, defined_at)


class JobTable:
    """Which jobs this scheduler holds, and when each fires next.

    RECENT maps a job to the scheduled time of the newest firing this process dispatched;
    with what it last adopted, it re-seeds a state that Redis lost.
    """

    def __init__(self, odb: OdbStore, state: JobState, recent: Mapping[str, dt.datetime]):
        self.odb = odb
        self.state = state
        self.recent = recent
        self.generation = -1
        self.entries: dict[str, Entry] = {}
        self.signatures: dict[str, str] = {}
        self.known: dict[str, Adopted] = {}  # what this process last adopted, per job
        # (fire time, job name); an item is current only while it equals the entry's next_run.
        self._heap: list[tuple[dt.datetime, str]] = []

    @property
    def jobs(self) -> dict[str, JobDef]:
        return {name: entry.job for name, entry in self.entries.items()}

    # -- from the ODB ------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> bool:
        """Bring the table up to the ODB's generation; True when it changed.

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
        # SQL notifications are fired like jobs (esb.notification).
        self.sync({**definitions.jobs, **notification_jobs(definitions)}, generation)
        return True

    def sync(self, jobs: Mapping[str, JobDef], generation: int) -> None:
        """Make the table hold exactly JOBS; unchanged jobs are left alone. Raises RedisError;
        the generation then stays behind, so the caller's next refresh tries again."""
        for name in sorted(set(self.entries) - set(jobs)):
            del self.entries[name]
            self.signatures.pop(name, None)
            self.known.pop(name, None)
            try:
                self.state.forget(name)
            except RedisError as exc:
                logger.warning("job %s removed; its state in Redis was not cleared (%s)", name, exc)
            logger.info("job %s removed", name, extra={"job": name})
        changed = [job for name, job in sorted(jobs.items())
                   if name not in self.entries or self.entries[name].job != job]
        added = {job.name for job in changed if job.name not in self.entries}
        self.place(changed, generation)
        for job in changed:
            if job.name in added:
                logger.info("job %s added (%s, service %s)", job.name, job.type, job.service,
                            extra={"job": job.name})
            else:
                logger.info("job %s changed", job.name, extra={"job": job.name})
        self.generation = generation
        self._rebuild_heap()
        logger.info("job table at generation %d: %d jobs", generation, len(self.entries))

    def resync(self) -> None:
        """Place every job again from Redis: after taking the lease over, or after Redis was
        unreachable, what fell due meanwhile goes through the misfire policy once.

        Raises RedisError; the caller retries.
        """
        self.place([entry.job for entry in self.entries.values()], self.generation)
        self._rebuild_heap()
        logger.info("job table resynchronised with Redis: %d jobs", len(self.entries))

    # -- placing jobs ------------------------------------------------------------------

    def place(self, jobs: list[JobDef], generation: int) -> None:
        """Add or replace JOBS, defined at ODB GENERATION, at the fire times their Redis state
        says, and record each next_run (if this scheduler holds the lease).

        Raises RedisError; the jobs not placed yet are then left as they were.
        """
        pipe = self.state.client.pipeline(transaction=False)
        for job in jobs:
            now = dt.datetime.now(UTC)
            signature = schedule_signature(job)
            seed = self._seed(job.name) if self.signatures.get(job.name) == signature else None
            defined_at = now + dt.timedelta(seconds=phase_s(job))
            adopted = self.state.adopt(job.name, signature, generation, defined_at,
                                       is_paused=job.paused, seed=seed)
            self.known[job.name] = adopted
            self.signatures[job.name] = signature
            next_run = self._enter(job, adopted, now)
            self.state.set_next_run(job.name, next_run, client=pipe)
        if jobs:
            pipe.execute()

    def _enter(self, job: JobDef, adopted: Adopted, now: dt.datetime) -> dt.datetime | None:
        try:
            trigger = make_trigger(job, adopted.defined_at)
        except ValueError as exc:  # validated on deploy; only a bad stored unit gets here
            logger.error("job %s cannot be scheduled (%s); it is not fired", job.name, exc)
            self.entries.pop(job.name, None)
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
        self.entries[job.name] = Entry(job, trigger, next_run)
        if next_run is not None:
            heapq.heappush(self._heap, (next_run, job.name))
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

    def finish(self, name: str) -> None:
        """A job that dispatched all its repeats fires no more (its next_run is cleared)."""
        entry = self.entries.get(name)
        if entry is not None:
            entry.next_run = None
        try:
            self.state.set_next_run(name, None)
        except RedisError as exc:
            logger.warning("job %s is done; its next_run was not cleared (%s)", name, exc)

    # -- the heap ----------------------------------------------------------------------

    def soonest(self) -> dt.datetime | None:
        """The next fire time of any job, or None when nothing will fire."""
        while self._heap and not self._is_current(*self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: dt.datetime) -> list[Due]:
        """Every job whose fire time came by NOW, with all its run times up to NOW, each
        already moved on to its next fire time."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            fire_time, name = heapq.heappop(self._heap)
            if not self._is_current(fire_time, name):
                continue
            entry = self.entries[name]
            run_times = [fire_time]
            next_run = entry.trigger.get_next_fire_time(fire_time, now)
            while next_run is not None and next_run <= now:
                run_times.append(next_run)
                next_run = entry.trigger.get_next_fire_time(next_run, now)
            entry.next_run = next_run
            if next_run is not None:
                heapq.heappush(self._heap, (next_run, name))
            due.append(Due(entry.job, run_times, next_run))
        return due

    def _is_current(self, fire_time: dt.datetime, name: str) -> bool:
        entry = self.entries.get(name)
        return entry is not None and entry.next_run == fire_time

    def _rebuild_heap(self) -> None:
        self._heap = [(e.next_run, name) for name, e in self.entries.items() if e.next_run]
        heapq.heapify(self._heap)
