"""The job-state scripts (esb.bus.jobstate) against real Redis: fencing, de-duplication,
overlap, repeats, adoption."""

from __future__ import annotations

import datetime as dt

import pytest
import redis

from esb.bus import Keys
from esb.bus.jobstate import JobState, parse_outcome, record_run
from esb.config import JobDef
from esb.scheduler.firings import firing_id, firing_message
from tests.conftest import REDIS_URL
from tests.integration.scheduler_support import unique_cluster

UTC = dt.UTC
T0 = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
JOB = JobDef(name="tick", service="test.tick", type="interval", seconds=1)


@pytest.fixture
def env():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    keys = Keys(unique_cluster())
    yield client, keys
    for key in client.scan_iter(match=f"{keys.prefix}*"):
        client.delete(key)


def active_state(client: redis.Redis, keys: Keys) -> JobState:
    """The job state of scheduler "a", holding the lease."""
    client.set(keys.scheduler_lease, "a")
    return JobState(client, keys, "a")


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def dispatch(state: JobState, scheduled_at, job: JobDef = JOB, on_overlap: str = "skip"):
    fid = firing_id(job.name, scheduled_at)
    return parse_outcome(state.dispatch(firing_message(job, fid, scheduled_at), scheduled_at,
                                        on_overlap=on_overlap, next_run=""))


def test_only_the_lease_holder_dispatches(env):
    client, keys = env
    active, standby = JobState(client, keys, "a"), JobState(client, keys, "b")
    client.set(keys.scheduler_lease, "a")
    assert dispatch(standby, at(1)).kind == "standby"
    assert dispatch(active, at(1)).kind == "dispatched"
    assert client.xlen(keys.dispatch) == 1


def test_a_firing_is_dispatched_once(env):
    client, keys = env
    state = active_state(client, keys)
    assert dispatch(state, at(1)).kind == "dispatched"
    record_run(client, keys, "tick", firing_id("tick", at(1)), 0.0, None)
    assert dispatch(state, at(1)).kind == "duplicate"
    assert dispatch(state, at(0.5)).kind == "duplicate"  # older than the last handled
    assert client.xlen(keys.dispatch) == 1


def test_overlap_skip_counts_missed_and_wait_reports_busy(env):
    client, keys = env
    state = active_state(client, keys)
    assert dispatch(state, at(1)).kind == "dispatched"
    skipped = dispatch(state, at(2))
    assert skipped.kind == "skipped" and skipped.detail == firing_id("tick", at(1))
    assert client.hget(keys.job_state("tick"), "missed") == "1"
    assert dispatch(state, at(3), on_overlap="wait").kind == "busy"
    record_run(client, keys, "tick", firing_id("tick", at(1)), 0.1, None)
    assert dispatch(state, at(3), on_overlap="wait").kind == "dispatched"
    assert client.get(keys.job_inflight("tick")) == firing_id("tick", at(3))


def test_a_marker_whose_stream_entry_is_gone_does_not_block(env):
    client, keys = env
    state = active_state(client, keys)
    assert dispatch(state, at(1)).kind == "dispatched"
    # The run ended (its entry was acknowledged and deleted) but the marker stayed behind.
    entry = client.hget(keys.job_state("tick"), "inflight_entry")
    client.xdel(keys.dispatch, entry)
    assert dispatch(state, at(2)).kind == "dispatched"


def test_missed_firings_are_counted_once(env):
    client, keys = env
    state = active_state(client, keys)
    for _ in range(2):
        state.count_missed("tick", [at(1), at(2), at(3)])
    fields = client.hgetall(keys.job_state("tick"))
    assert fields["missed"] == "3"
    assert dispatch(state, at(3)).kind == "duplicate"


def test_adopt_keeps_an_unchanged_schedule_and_restarts_a_changed_one(env):
    client, keys = env
    state = active_state(client, keys)
    first = state.adopt("tick", "sig1", 1, at(0), is_paused=False)
    assert first.defined_at == at(0) and first.last_scheduled is None
    dispatch(state, at(1))
    again = state.adopt("tick", "sig1", 2, at(100), is_paused=False)
    assert again.defined_at == at(0) and again.last_scheduled == at(1)
    changed = state.adopt("tick", "sig2", 3, at(200), is_paused=False)
    assert changed.defined_at == at(200) and changed.last_scheduled is None
    # A scheduler still at an older generation does not roll the schedule back.
    stale = state.adopt("tick", "sig1", 2, at(300), is_paused=False)
    assert stale.defined_at == at(200)


def test_adopt_reseeds_a_lost_state_and_records_resumption(env):
    client, keys = env
    state = JobState(client, keys, "a")
    seed = state.adopt("tick", "sig1", 1, at(0), is_paused=False)
    client.delete(keys.job_state("tick"))  # Redis lost it
    again = state.adopt("tick", "sig1", 1, at(500), is_paused=True, seed=seed)
    assert again.defined_at == at(0)
    resumed = state.adopt("tick", "sig1", 1, at(600), is_paused=False)
    assert resumed.resumed_at == at(600)


def test_no_dispatch_past_the_repeats(env):
    client, keys = env
    state = active_state(client, keys)
    job = JobDef(name="tick", service="test.tick", type="interval", seconds=1, repeats=1)

    def fire(seconds: float):
        scheduled_at = at(seconds)
        fid = firing_id(job.name, scheduled_at)
        return parse_outcome(state.dispatch(firing_message(job, fid, scheduled_at), scheduled_at,
                                            on_overlap="skip", next_run="", repeats=job.repeats))

    assert fire(1).kind == "dispatched"
    record_run(client, keys, "tick", firing_id("tick", at(1)), 0.0, None)
    assert fire(2).kind == "done"
    assert client.xlen(keys.dispatch) == 1
