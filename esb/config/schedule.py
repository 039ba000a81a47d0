"""A job's schedule: its moments, its crontab fields and its APScheduler 3 trigger, and the
one judge of whether a ``[[scheduler.job]]`` can be scheduled.

Both the definitions (to reject a unit on deploy) and the scheduler (to fire) come here.
Triggers are anchored so that every scheduler computes the same fire times: an interval
job's times are ``defined_at + k * interval`` (or count from its ``start_date``), whichever
process computes them and however often it restarts.

APScheduler is imported only where a trigger is built: workers read job definitions but
never build a trigger, and never load APScheduler.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from apscheduler.triggers.base import BaseTrigger

    from esb.config.definitions import JobDef

UTC = dt.UTC
JOB_TYPES = ("one_time", "interval", "cron")

# Crontab numbers days of the week from Sunday (0 or 7); APScheduler 3 numbers them from
# Monday. Names mean the same to both, so numeric day-of-week fields are rewritten as names.
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_PART = re.compile(r"^(\*|\d+)(?:-(\d+))?(?:/(\d+))?$")

# The fields that decide when a job fires; changing any of them restarts its schedule.
_SCHEDULE_FIELDS = (
    "type", "weeks", "days", "hours", "minutes", "seconds", "cron", "timezone",
    "start_date", "end_date", "repeats",
)


def parse_moment(value: str, timezone: str = "UTC") -> dt.datetime:
    """An ISO 8601 date or date-time; without an offset it is read in TIMEZONE.

    Raises ValueError for anything else.
    """
    moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(timezone))
    return moment


def cron_fields(expression: str | None) -> list[str]:
    """The five fields of a crontab expression; raises ValueError for another count."""
    fields = (expression or "").split()
    if len(fields) != 5:
        raise ValueError("a cron job needs a five-field crontab expression")
    return fields


def crontab_day_of_week(field: str) -> str:
    """Rewrite a crontab day-of-week field (0 or 7 = Sunday) as day names APScheduler reads.

    Raises ValueError for a malformed numeric field.
    """
    if field == "*" or re.search(r"[a-zA-Z]", field):
        return field
    days: set[int] = set()
    for part in field.split(","):
        match = _DOW_PART.match(part)
        if not match:
            raise ValueError(f"bad day-of-week {part!r}")
        start, end, step = match.groups()
        if start == "*":
            low, high = 0, 6
        else:
            low = int(start)
            high = int(end) if end is not None else (6 if step else low)
        if not (0 <= low <= 7 and 0 <= high <= 7) or low > high:
            raise ValueError(f"bad day-of-week {part!r}")
        days.update(day % 7 for day in range(low, high + 1, int(step or 1)))
    return ",".join(_DAY_NAMES[day] for day in sorted(days))


def make_trigger(job: JobDef, defined_at: dt.datetime) -> BaseTrigger:
    """The trigger of JOB, whose schedule began at DEFINED_AT (a UTC datetime).

    Raises ValueError (or ZoneInfoNotFoundError) when the definition cannot be scheduled.
    """
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.date import DateTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    timezone = ZoneInfo(job.timezone)
    start = parse_moment(job.start_date, job.timezone) if job.start_date else None
    end = parse_moment(job.end_date, job.timezone) if job.end_date else None
    if job.type == "one_time":
        if start is None:
            raise ValueError("a one_time job needs start_date")
        return DateTrigger(run_date=start, timezone=timezone)
    if job.type == "interval":
        if job.interval_s <= 0:
            raise ValueError("an interval job needs weeks, days, hours, minutes or seconds")
        # The documented default: the first run is one interval after the job is defined.
        first = start or defined_at + dt.timedelta(seconds=job.interval_s)
        return IntervalTrigger(
            seconds=job.interval_s, start_date=first, end_date=end, timezone=timezone
        )
    if job.type == "cron":
        minute, hour, day, month, day_of_week = cron_fields(job.cron)
        return CronTrigger(
            minute=minute, hour=hour, day=day, month=month,
            day_of_week=crontab_day_of_week(day_of_week),
            start_date=start, end_date=end, timezone=timezone,
        )
    raise ValueError(f"unknown job type {job.type!r}")


def schedule_problem(job: JobDef) -> tuple[str, str] | None:
    """(key, reason) when JOB's schedule is incomplete or unreadable, else None.

    Checks what a definition alone tells; ``trigger_problem`` then builds the trigger.
    """
    if job.type not in JOB_TYPES:
        return "type", "must be one_time, interval or cron"
    if job.type == "interval" and job.interval_s <= 0:
        return "seconds", "an interval job needs weeks, days, hours, minutes or seconds"
    if job.type == "cron":
        try:
            cron_fields(job.cron)
        except ValueError as exc:
            return "cron", str(exc)
    if job.type == "one_time" and job.start_date is None:
        return "start_date", "a one_time job needs start_date"
    try:
        ZoneInfo(job.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return "timezone", f"unknown time zone {job.timezone!r}"
    for key in ("start_date", "end_date"):
        value = getattr(job, key)
        if value is not None:
            try:
                parse_moment(value, job.timezone)
            except ValueError:
                return key, f"not an ISO 8601 date-time: {value!r}"
    return None


def trigger_problem(job: JobDef) -> tuple[str, str] | None:
    """(key, reason) when JOB passes ``schedule_problem`` but APScheduler cannot build its
    trigger (a cron field out of range, say), else None."""
    try:
        make_trigger(job, dt.datetime.now(UTC))
    except ValueError as exc:
        return ("cron" if job.type == "cron" else "type"), str(exc)
    return None


def schedule_signature(job: JobDef) -> str:
    """A digest of the fields that decide when JOB fires (not its payload or service)."""
    facts = {name: getattr(job, name) for name in _SCHEDULE_FIELDS}
    text = json.dumps(facts, sort_keys=True, default=str)
    # Imported here: hashlib loads OpenSSL's libcrypto, 3.6 MB of RSS in the launcher,
    # which imports this module (for server.conf) but never computes a signature.
    import hashlib

    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]
