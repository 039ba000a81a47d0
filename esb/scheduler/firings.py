"""Firings: their stable ids, their stream message, and the misfire policy, as pure functions.

A firing's id is the job name and its scheduled time, so the same firing computed by two
schedulers, or by one scheduler before and after a restart, has the same id, and the
dispatch script adds it to the stream at most once.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from esb.bus import DispatchMessage
from esb.bus.jobstate import iso
from esb.config import JobDef

UTC = dt.UTC

# A firing dispatched this late is on time, whatever the grace: it is the scheduler's own
# latency (a busy loop, a slow Redis round trip), not a misfire.
ON_TIME_S = 1.0


def firing_id(job: str, scheduled_at: dt.datetime) -> str:
    """``job@2030-01-01T00:00:00.000000Z``: stable across schedulers and restarts."""
    return f"{job}@{iso(scheduled_at)}"


def manual_firing_id(job: str) -> str:
    """A firing asked for by hand (``esb jobs DIR run NAME``) is new every time."""
    return f"{job}@manual-{uuid.uuid4().hex[:12]}"


def firing_message(job: JobDef, fid: str, scheduled_at: dt.datetime) -> DispatchMessage:
    """The stream message of one firing; the worker builds ``request.job`` from ``job``."""
    return DispatchMessage(
        msg_id=fid, service=job.service, payload=job.payload, cid=fid,
        job={"name": job.name, "firing_id": fid, "scheduled_at": iso(scheduled_at)},
    )


@dataclass(frozen=True)
class FiringPlan:
    """What to do with the run times that fell due for one job at one moment."""

    dispatch: list[dt.datetime] = field(default_factory=list)
    late: list[dt.datetime] = field(default_factory=list)  # past the grace time: skipped
    coalesced: list[dt.datetime] = field(default_factory=list)  # folded into a later run

    @property
    def missed(self) -> int:
        return len(self.late) + len(self.coalesced)


def plan_firings(
    run_times: list[dt.datetime], now: dt.datetime, *, grace_s: float, coalesce: bool
) -> FiringPlan:
    """Apply the misfire policy to RUN_TIMES (oldest first) as of NOW.

    A run time later than ``grace_s`` (at least ON_TIME_S) is skipped; of the rest,
    ``coalesce`` keeps only the newest, so firings that piled up while nothing could
    dispatch them make one late run.
    """
    grace = dt.timedelta(seconds=max(grace_s, ON_TIME_S))
    late = [t for t in run_times if now - t > grace]
    timely = [t for t in run_times if now - t <= grace]
    if coalesce and len(timely) > 1:
        return FiringPlan(dispatch=timely[-1:], late=late, coalesced=timely[:-1])
    return FiringPlan(dispatch=timely, late=late)
