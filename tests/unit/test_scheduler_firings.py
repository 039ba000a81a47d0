"""Firing ids and the misfire policy."""

from __future__ import annotations

import datetime as dt

from esb.scheduler.firings import firing_id, iso, manual_firing_id, plan_firings

UTC = dt.UTC
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_firing_id_is_stable_and_names_job_and_time():
    assert firing_id("tick", at(1.5)) == "tick@2030-01-01T12:00:01.500000Z"
    other_zone = at(1.5).astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert firing_id("tick", other_zone) == firing_id("tick", at(1.5))


def test_manual_firing_ids_are_fresh():
    assert manual_firing_id("tick") != manual_firing_id("tick")
    assert manual_firing_id("tick").startswith("tick@manual-")


def test_iso_is_utc_with_z():
    assert iso(at(0)) == "2030-01-01T12:00:00.000000Z"


def test_on_time_firing_is_dispatched():
    plan = plan_firings([at(0)], at(0.01), grace_s=30, coalesce=True)
    assert plan.dispatch == [at(0)] and plan.missed == 0


def test_piled_up_firings_within_grace_coalesce_into_one_late_run():
    plan = plan_firings([at(0), at(1), at(2), at(3)], at(5), grace_s=30, coalesce=True)
    assert plan.dispatch == [at(3)]
    assert plan.coalesced == [at(0), at(1), at(2)]
    assert plan.missed == 3


def test_firings_past_the_grace_are_skipped_and_counted():
    plan = plan_firings([at(0), at(10), at(50)], at(55), grace_s=30, coalesce=True)
    assert plan.late == [at(0), at(10)]
    assert plan.dispatch == [at(50)]
    assert plan.missed == 2


def test_everything_late_dispatches_nothing():
    plan = plan_firings([at(0), at(1)], at(100), grace_s=30, coalesce=True)
    assert plan.dispatch == [] and plan.missed == 2


def test_without_coalesce_every_timely_firing_is_dispatched():
    plan = plan_firings([at(0), at(1), at(2)], at(3), grace_s=30, coalesce=False)
    assert plan.dispatch == [at(0), at(1), at(2)] and plan.missed == 0


def test_zero_grace_still_dispatches_a_firing_dispatched_with_the_usual_latency():
    plan = plan_firings([at(0)], at(0.05), grace_s=0, coalesce=True)
    assert plan.dispatch == [at(0)]
    plan = plan_firings([at(0), at(1)], at(3), grace_s=0, coalesce=True)
    assert plan.dispatch == [] and plan.late == [at(0), at(1)]
