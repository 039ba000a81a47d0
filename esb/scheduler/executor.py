"""The scheduler's executor: it never runs a service, it puts firings on the dispatch stream.

APScheduler hands each due job to ``DispatchExecutor.submit_job``, which only queues it;
the ``Dispatcher`` thread applies the misfire policy, then dispatches the firings of a
whole batch in one Redis pipeline of Lua scripts (fenced by the lease, de-duplicated by
firing id, guarded against overlapping runs). Workers run the services.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.executors.base import BaseExecutor
from redis.exceptions import RedisError

from esb.bus import DispatchMessage
from esb.config import JobDef
from esb.scheduler.firings import FiringPlan, firing_id, iso, manual_firing_id, plan_firings
from esb.scheduler.state import KEEP, JobState, Outcome, parse_outcome

logger = logging.getLogger(__name__)

UTC = dt.UTC
MISSED_CHUNK = 1000  # run times per script call when many fell due during an outage
WAIT_RETRY_S = 0.1  # how often a firing waiting for the previous run looks again


@dataclass
class Submission:
    """Run times of one job that fell due, as APScheduler handed them over."""

    job: JobDef
    run_times: list[dt.datetime]
    next_run: dt.datetime | None


class DispatchExecutor(BaseExecutor):
    """APScheduler executor whose 'run' is a hand-over to the dispatcher thread."""

    def __init__(self, dispatcher: Dispatcher):
        super().__init__()
        self.dispatcher = dispatcher

    def submit_job(self, job, run_times) -> None:
        # Not BaseExecutor's: its max_instances counts local runs, and ours run elsewhere;
        # overlapping runs are prevented in Redis by the job's in-flight marker instead.
        now = dt.datetime.now(UTC)
        next_run = job.trigger.get_next_fire_time(run_times[-1], now)
        self.dispatcher.submit(Submission(job.args[0], list(run_times), next_run))

    def _do_submit_job(self, job, run_times) -> None:
        raise NotImplementedError("submit_job hands jobs to the dispatcher directly")


class Dispatcher:
    """Turns submissions into dispatched or missed firings; one thread, one pipeline a batch.

    ``is_active`` says whether this scheduler holds the lease: a standby drops what falls
    due (the active one dispatches it) and catches up through ``needs_resync`` when it
    takes over. A Redis failure also sets ``needs_resync``: what fell due meanwhile is
    then handled by the misfire policy.
    """

    def __init__(
        self,
        state: JobState,
        *,
        is_active: Callable[[], bool],
        default_grace_s: float,
        inflight_ttl_s: float,
        on_repeats_done: Callable[[str], None],
    ):
        self.state = state
        self.is_active = is_active
        self.default_grace_s = default_grace_s
        self.inflight_ttl_ms = int(inflight_ttl_s * 1000)
        self.on_repeats_done = on_repeats_done
        self.queue: queue.Queue[Submission] = queue.Queue()
        # At most one firing per job waits for the previous run to end (on_overlap = wait).
        self.waiting: dict[str, tuple[JobDef, dt.datetime]] = {}
        self.needs_resync = threading.Event()
        self.lost_lease = threading.Event()
        self.dispatched = 0
        self.last_scheduled: dict[str, dt.datetime] = {}  # newest firing dispatched, per job
        self._stopped = threading.Event()
        self._failing = False

    def submit(self, submission: Submission) -> None:
        self.queue.put(submission)

    def stop(self) -> None:
        self._stopped.set()

    def run_forever(self) -> None:
        while not self._stopped.is_set():
            batch = self._take_batch()
            if not batch and not self.waiting:
                continue
            if not self.is_active():
                if batch:
                    logger.debug("standby: %d due jobs left to the active scheduler", len(batch))
                    # Should this scheduler take over, it first places its jobs again from
                    # Redis, so what it drops here is dispatched or counted by the policy.
                    self.needs_resync.set()
                self.waiting.clear()
                continue
            try:
                self.dispatch_batch(batch)
            except RedisError as exc:
                self._note_failure(exc, batch)
            else:
                if self._failing:
                    logger.info("dispatch: Redis answers again")
                    self._failing = False

    def _take_batch(self) -> list[Submission]:
        timeout = WAIT_RETRY_S if self.waiting else 0.5
        try:
            batch = [self.queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                return batch

    def _note_failure(self, exc: RedisError, batch: list[Submission]) -> None:
        names = sorted({s.job.name for s in batch} | set(self.waiting))
        if not self._failing:
            logger.warning(
                "dispatch: Redis unavailable (%s); firings of %s not dispatched; once Redis "
                "answers the misfire policy decides what still runs", exc, ", ".join(names) or "-")
            self._failing = True
        self.waiting.clear()
        self.needs_resync.set()

    def dispatch_batch(self, batch: list[Submission]) -> None:
        """Plan every submission, send all scripts in one pipeline, act on the outcomes."""
        now = dt.datetime.now(UTC)
        pipe = self.state.client.pipeline(transaction=False)
        sent: list[tuple[str, JobDef, dt.datetime | None]] = []  # (what, job, scheduled_at)
        misses: list[tuple[JobDef, FiringPlan, float]] = []
        waiting, self.waiting = list(self.waiting.values()), {}
        for job, scheduled_at in waiting:
            self._queue_dispatch(pipe, job, scheduled_at, None, keep_next=True)
            sent.append(("dispatch", job, scheduled_at))
        for submission in batch:
            job = submission.job
            grace_s = self.default_grace_s if job.misfire_grace_s is None else job.misfire_grace_s
            plan = plan_firings(submission.run_times, now, grace_s=grace_s, coalesce=job.coalesce)
            if plan.missed:
                skipped = plan.late + plan.coalesced
                for start in range(0, len(skipped), MISSED_CHUNK):
                    keys, args = self.state.missed_args(job.name, skipped[start:start + MISSED_CHUNK])
                    self.state.missed_script(keys=keys, args=args, client=pipe)
                    sent.append(("missed", job, None))
                misses.append((job, plan, grace_s))
            last = plan.dispatch[-1] if plan.dispatch else None
            for scheduled_at in plan.dispatch:
                # next_run is only final after the newest firing of the batch.
                next_run = submission.next_run if scheduled_at is last else None
                self._queue_dispatch(pipe, job, scheduled_at, next_run,
                                     keep_next=scheduled_at is not last)
                sent.append(("dispatch", job, scheduled_at))
            if not plan.dispatch:
                next_run_text = iso(submission.next_run) if submission.next_run else ""
                self.state.set_if_active(job.name, client=pipe, next_run=next_run_text)
                sent.append(("next_run", job, None))
        if not sent:
            return
        counted: dict[str, int] = {}
        for (what, job, scheduled_at), reply in zip(sent, pipe.execute(), strict=True):
            if what == "dispatch":
                self._on_outcome(job, scheduled_at, parse_outcome(reply))
            elif what == "missed" and reply == -1:
                self._on_standby()
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

    def _queue_dispatch(
        self, pipe, job: JobDef, scheduled_at: dt.datetime, next_run: dt.datetime | None,
        *, keep_next: bool = False,
    ) -> None:
        fid = firing_id(job.name, scheduled_at)
        message = self.message(job, fid, scheduled_at)
        next_text = KEEP if keep_next else (iso(next_run) if next_run else "")
        keys, args = self.state.dispatch_args(
            job.name, message, scheduled_at, inflight_ttl_ms=self.inflight_ttl_ms,
            on_overlap=job.on_overlap, next_run=next_text, repeats=job.repeats,
        )
        self.state.dispatch_script(keys=keys, args=args, client=pipe)

    @staticmethod
    def message(job: JobDef, fid: str, scheduled_at: dt.datetime) -> DispatchMessage:
        """The stream message of one firing; the worker builds request.job from ``job``."""
        return DispatchMessage(
            msg_id=fid, service=job.service, payload=job.payload, cid=fid,
            job={"name": job.name, "firing_id": fid, "scheduled_at": iso(scheduled_at)},
        )

    def _on_outcome(self, job: JobDef, scheduled_at: dt.datetime | None, outcome: Outcome) -> None:
        fid = firing_id(job.name, scheduled_at) if scheduled_at else "-"
        extra = {"job": job.name}
        if outcome.kind == "dispatched":
            self.dispatched += 1
            if scheduled_at is not None:
                self.last_scheduled[job.name] = scheduled_at
            logger.debug("job %s: dispatched firing %s", job.name, fid, extra=extra)
            if job.repeats is not None and outcome.dispatched >= job.repeats:
                logger.info("job %s: dispatched all %d repeats; it will not fire again",
                            job.name, job.repeats, extra=extra)
                self.on_repeats_done(job.name)
        elif outcome.kind == "skipped":
            logger.warning("job %s: firing %s skipped and counted missed: the previous run "
                           "(%s) is still in progress", job.name, fid, outcome.detail, extra=extra)
        elif outcome.kind == "busy" and scheduled_at is not None:
            if job.name in self.waiting:
                logger.warning("job %s: firing %s dropped: an earlier one already waits for "
                               "run %s to end", job.name, fid, outcome.detail, extra=extra)
                keys, args = self.state.missed_args(job.name, [scheduled_at])
                self.state.missed_script(keys=keys, args=args)
            else:
                logger.info("job %s: firing %s waits for the previous run (%s) to end",
                            job.name, fid, outcome.detail, extra=extra)
                self.waiting[job.name] = (job, scheduled_at)
        elif outcome.kind == "standby":
            self._on_standby()
        elif outcome.kind == "done":
            self.on_repeats_done(job.name)
        else:
            logger.debug("job %s: firing %s was already dispatched", job.name, fid, extra=extra)

    def _on_standby(self) -> None:
        if not self.lost_lease.is_set():
            logger.warning("dispatch refused: this scheduler no longer holds the lease")
        self.lost_lease.set()

    def run_now(self, job: JobDef) -> tuple[Outcome, str]:
        """Dispatch one manual firing of JOB now (``esb jobs DIR run NAME``).

        It does not move the schedule and respects a run in progress (answer ``busy``).
        Raises RedisError when Redis cannot be reached.
        """
        fid = manual_firing_id(job.name)
        now = dt.datetime.now(UTC)
        message = self.message(job, fid, now)
        keys, args = self.state.dispatch_args(
            job.name, message, None, inflight_ttl_ms=self.inflight_ttl_ms,
            on_overlap=job.on_overlap, next_run=KEEP,
        )
        outcome = parse_outcome(self.state.dispatch_script(keys=keys, args=args))
        logger.info("job %s: manual firing %s: %s", job.name, fid, outcome.kind,
                    extra={"job": job.name})
        return outcome, fid
