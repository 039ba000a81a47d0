"""Due firings -> the dispatch stream: the misfire policy, then one pipeline for all of them.

The scheduler loop hands over what fell due (``JobTable.pop_due``); ``send`` plans each
job's run times (misfire grace, coalescing), queues one fenced Lua script per firing
(``JobState.dispatch``: lease, de-duplication by firing id, overlap, repeats), sends them
in one round trip, and acts on each answer. Workers run the services.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from esb.bus.jobstate import KEEP, JobState, Outcome, iso, parse_outcome
from esb.config import JobDef
from esb.scheduler.firings import FiringPlan, firing_id, firing_message, manual_firing_id, plan_firings
from esb.scheduler.jobs import Due

logger = logging.getLogger(__name__)

UTC = dt.UTC
MISSED_CHUNK = 1000  # run times per script call when many fell due during an outage


@dataclass
class Sent:
    """What the loop must act on after a ``send``."""

    is_lease_lost: bool = False  # Redis said another scheduler holds the lease
    finished: list[str] = field(default_factory=list)  # jobs that dispatched all repeats


class Dispatcher:
    """Sends firings for the loop that owns it; every method may raise RedisError.

    A firing that must wait for the previous run of its job (``on_overlap = "wait"``) is
    kept in ``waiting`` and sent again with the next ``send``; at most one per job waits.
    """

    def __init__(self, state: JobState, *, default_grace_s: float):
        self.state = state
        self.default_grace_s = default_grace_s
        self.waiting: dict[str, tuple[JobDef, dt.datetime]] = {}
        self.dispatched = 0
        self.last_scheduled: dict[str, dt.datetime] = {}  # newest firing dispatched, per job

    def send(self, due: list[Due]) -> Sent:
        """Plan every due job, send all scripts in one pipeline, act on the answers."""
        now = dt.datetime.now(UTC)
        sent = Sent()
        pipe = self.state.client.pipeline(transaction=False)
        queued: list[tuple[str, JobDef, dt.datetime | None]] = []  # (what, job, scheduled_at)
        misses: list[tuple[JobDef, FiringPlan, float]] = []
        retried, self.waiting = self.waiting, {}
        for job, scheduled_at in retried.values():
            self._queue_dispatch(pipe, job, scheduled_at, KEEP)
            queued.append(("retry", job, scheduled_at))
        for item in due:
            job = item.job
            grace_s = self.default_grace_s if job.misfire_grace_s is None else job.misfire_grace_s
            plan = plan_firings(item.run_times, now, grace_s=grace_s, coalesce=job.coalesce)
            if plan.missed:
                skipped = plan.late + plan.coalesced
                for start in range(0, len(skipped), MISSED_CHUNK):
                    self.state.count_missed(job.name, skipped[start:start + MISSED_CHUNK], client=pipe)
                    queued.append(("missed", job, None))
                misses.append((job, plan, grace_s))
            for scheduled_at in plan.dispatch:
                # next_run is only final after the newest firing of the batch.
                is_last = scheduled_at is plan.dispatch[-1]
                next_run = (iso(item.next_run) if item.next_run else "") if is_last else KEEP
                self._queue_dispatch(pipe, job, scheduled_at, next_run)
                queued.append(("dispatch", job, scheduled_at))
            if not plan.dispatch:
                self.state.set_next_run(job.name, item.next_run, client=pipe)
                queued.append(("next_run", job, None))
        if not queued:
            return sent
        counted: dict[str, int] = {}
        for (what, job, scheduled_at), reply in zip(queued, pipe.execute(), strict=True):
            if what in ("dispatch", "retry"):
                self._on_outcome(job, scheduled_at, parse_outcome(reply), sent,
                                 was_waiting=what == "retry")
            elif what == "missed" and reply == -1:
                sent.is_lease_lost = True
            elif what == "missed":
                counted[job.name] = counted.get(job.name, 0) + int(reply)
        for job, plan, grace_s in misses:
            # Firings a previous scheduler (or this one, before a resync) already handled
            # are not counted again, so only the newly counted ones are reported.
            if counted.get(job.name):
                skipped = plan.late + plan.coalesced
                logger.warning(
                    "job %s: %d firing(s) missed (%d past the %s s grace, %d coalesced into a "
                    "later run), from %s to %s", job.name, counted[job.name], len(plan.late),
                    grace_s, len(plan.coalesced), iso(min(skipped)), iso(max(skipped)),
                    extra={"job": job.name})
        if sent.is_lease_lost:
            self.waiting.clear()
        return sent

    def _queue_dispatch(self, pipe, job: JobDef, scheduled_at: dt.datetime, next_run: str) -> None:
        fid = firing_id(job.name, scheduled_at)
        self.state.dispatch(firing_message(job, fid, scheduled_at), scheduled_at,
                            on_overlap=job.on_overlap, next_run=next_run, repeats=job.repeats,
                            client=pipe)

    def _on_outcome(self, job: JobDef, scheduled_at: dt.datetime, outcome: Outcome, sent: Sent,
                    *, was_waiting: bool) -> None:
        fid = firing_id(job.name, scheduled_at)
        extra = {"job": job.name}
        if outcome.kind == "dispatched":
            self.dispatched += 1
            self.last_scheduled[job.name] = scheduled_at
            logger.debug("job %s: dispatched firing %s", job.name, fid, extra=extra)
            if job.repeats is not None and outcome.dispatched >= job.repeats:
                logger.info("job %s: dispatched all %d repeats; it will not fire again",
                            job.name, job.repeats, extra=extra)
                sent.finished.append(job.name)
        elif outcome.kind == "skipped":
            logger.warning("job %s: firing %s skipped and counted missed: the previous run "
                           "(%s) is still in progress", job.name, fid, outcome.detail, extra=extra)
        elif outcome.kind == "busy":
            if job.name in self.waiting:
                logger.warning("job %s: firing %s dropped: an earlier one already waits for "
                               "run %s to end", job.name, fid, outcome.detail, extra=extra)
                self.state.count_missed(job.name, [scheduled_at])
            else:
                if not was_waiting:
                    logger.info("job %s: firing %s waits for the previous run (%s) to end",
                                job.name, fid, outcome.detail, extra=extra)
                self.waiting[job.name] = (job, scheduled_at)
        elif outcome.kind == "standby":
            sent.is_lease_lost = True
        elif outcome.kind == "done":
            sent.finished.append(job.name)
        else:
            logger.debug("job %s: firing %s was already dispatched", job.name, fid, extra=extra)

    def run_now(self, job: JobDef) -> tuple[Outcome, str]:
        """Dispatch one manual firing of JOB now (``esb jobs DIR run NAME``).

        It does not move the schedule and respects a run in progress (answer ``busy``).
        """
        fid = manual_firing_id(job.name)
        message = firing_message(job, fid, dt.datetime.now(UTC))
        outcome = parse_outcome(self.state.dispatch(message, None, on_overlap=job.on_overlap,
                                                    next_run=KEEP))
        logger.info("job %s: manual firing %s: %s", job.name, fid, outcome.kind,
                    extra={"job": job.name})
        return outcome, fid
