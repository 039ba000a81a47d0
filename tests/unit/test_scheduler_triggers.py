"""Job definitions -> APScheduler triggers (esb.config.schedule), and where a (re)built
schedule continues (esb.scheduler.jobs)."""

from __future__ import annotations

import datetime as dt

import pytest

from esb.config import JobDef, merge_units
from esb.config.schedule import crontab_day_of_week, make_trigger, schedule_signature
from esb.errors import ConfigError
from esb.scheduler.jobs import first_fire_time

UTC = dt.UTC
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def job(**fields) -> JobDef:
    return JobDef(**({"name": "j", "service": "s", "type": "interval"} | fields))


def test_interval_first_run_is_one_interval_after_definition():
    trigger = make_trigger(job(seconds=5), T0)
    assert trigger.get_next_fire_time(None, T0) == T0 + dt.timedelta(seconds=5)


def test_interval_times_stay_on_the_definition_grid():
    trigger = make_trigger(job(minutes=1, seconds=30), T0)
    later = T0 + dt.timedelta(seconds=200)
    assert trigger.get_next_fire_time(None, later) == T0 + dt.timedelta(seconds=270)


def test_interval_with_start_date_starts_there():
    trigger = make_trigger(job(seconds=10, start_date="2030-06-01T00:00:00Z"), T0)
    assert trigger.get_next_fire_time(None, T0) == dt.datetime(2030, 6, 1, tzinfo=UTC)


def test_naive_start_date_is_read_in_the_jobs_timezone():
    trigger = make_trigger(job(type="one_time", start_date="2030-06-01T09:00:00",
                               timezone="Europe/Prague"), T0)
    assert trigger.get_next_fire_time(None, T0) == dt.datetime(2030, 6, 1, 7, tzinfo=UTC)


def test_one_time_fires_once():
    trigger = make_trigger(job(type="one_time", start_date="2030-01-01T12:00:10Z"), T0)
    first = trigger.get_next_fire_time(None, T0)
    assert first == T0 + dt.timedelta(seconds=10)
    assert trigger.get_next_fire_time(first, first) is None


def test_cron_in_a_timezone():
    trigger = make_trigger(job(type="cron", cron="30 8 * * *", timezone="America/New_York"), T0)
    # 08:30 in New York on 1 January is 13:30 UTC.
    assert trigger.get_next_fire_time(None, T0) == dt.datetime(2030, 1, 1, 13, 30, tzinfo=UTC)


def test_cron_day_of_week_counts_from_sunday_as_crontab_does():
    # 2030-01-01 is a Tuesday; crontab's 0 is Sunday, so the next match is 6 January.
    trigger = make_trigger(job(type="cron", cron="0 0 * * 0"), T0)
    assert trigger.get_next_fire_time(None, T0) == dt.datetime(2030, 1, 6, tzinfo=UTC)
    weekdays = make_trigger(job(type="cron", cron="0 0 * * 1-5"), T0)
    assert weekdays.get_next_fire_time(None, T0) == dt.datetime(2030, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize("field, names", [
    ("*", "*"), ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"),
    ("*/2", "sun,tue,thu,sat"), ("5-7", "sun,fri,sat"), ("mon-fri", "mon-fri"),
    ("0,3", "sun,wed"),
])
def test_crontab_day_of_week(field, names):
    assert crontab_day_of_week(field) == names


def test_signature_ignores_what_does_not_move_the_schedule():
    base = job(seconds=5)
    assert schedule_signature(base) == schedule_signature(job(seconds=5, payload={"a": 1},
                                                              service="other", paused=True))
    assert schedule_signature(base) != schedule_signature(job(seconds=6))


def test_first_fire_time_continues_after_the_last_handled_firing():
    trigger = make_trigger(job(seconds=10), T0)
    last = T0 + dt.timedelta(seconds=30)
    now = T0 + dt.timedelta(seconds=95)
    # The firing after the last handled one, even in the past: the misfire policy decides.
    assert first_fire_time(trigger, now, defined_at=T0, last_scheduled=last,
                           resumed_at=None) == T0 + dt.timedelta(seconds=40)


def test_first_fire_time_of_a_never_fired_job_is_its_first_time():
    trigger = make_trigger(job(seconds=10), T0)
    now = T0 + dt.timedelta(seconds=95)
    assert first_fire_time(trigger, now, defined_at=T0, last_scheduled=None,
                           resumed_at=None) == T0 + dt.timedelta(seconds=10)


def test_first_fire_time_after_resumption_skips_the_pause():
    trigger = make_trigger(job(seconds=10), T0)
    resumed = T0 + dt.timedelta(seconds=301)
    assert first_fire_time(trigger, resumed, defined_at=T0,
                           last_scheduled=T0 + dt.timedelta(seconds=20),
                           resumed_at=resumed) == T0 + dt.timedelta(seconds=310)


def test_first_fire_time_of_a_fired_one_time_job_is_none():
    trigger = make_trigger(job(type="one_time", start_date="2030-01-01T12:00:10Z"), T0)
    assert first_fire_time(trigger, T0 + dt.timedelta(minutes=1), defined_at=T0,
                           last_scheduled=T0 + dt.timedelta(seconds=10), resumed_at=None) is None


@pytest.mark.parametrize("body, key", [
    ('type = "cron"\ncron = "61 * * * *"', "cron"),
    ('type = "cron"\ncron = "* * * * 9"', "cron"),
    ('type = "interval"\nseconds = 1\ntimezone = "Nowhere/Else"', "timezone"),
    ('type = "one_time"\nstart_date = "soon"', "start_date"),
])
def test_definitions_reject_unschedulable_jobs(body, key):
    text = f'[[scheduler.job]]\nname = "j"\nservice = "s"\n{body}\n'
    with pytest.raises(ConfigError) as info:
        merge_units([("jobs.toml", text)])
    assert info.value.key == f"scheduler.job[0].{key}"
