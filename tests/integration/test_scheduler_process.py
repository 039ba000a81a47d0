"""The scheduler process against real Redis and an SQLite ODB: what it puts on the dispatch
stream, run by a stand-in worker around esb's own dispatch consumer."""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import re
import signal
import time

import pytest

from esb.bus import parse_iso
from esb.bus.jobstate import KEEP, JobState, parse_outcome
from esb.cli import jobs as jobs_cli
from esb.config import load_server_config, merge_units
from esb.odb import UNIT
from esb.scheduler.firings import firing_message
from esb.status import collect_status
from tests.helpers import wait_until
from tests.integration.scheduler_support import (
    SchedulerProc,
    ServerDir,
    StandInWorker,
    job_toml,
    make_server_dir,
)


@pytest.fixture
def server(tmp_path, cluster):
    made: list[ServerDir] = []
    procs: list[SchedulerProc] = []
    workers: list[StandInWorker] = []

    def make(units: dict[str, str], scheduler: dict | None = None) -> ServerDir:
        made.append(make_server_dir(tmp_path, cluster, units=units, scheduler=scheduler))
        return made[-1]

    make.procs = procs
    make.workers = workers
    yield make
    for proc in procs:
        proc.kill()
    for worker in workers:
        worker.stop()
    for server_dir in made:
        server_dir.close()


def start_scheduler(make, server_dir: ServerDir) -> SchedulerProc:
    proc = SchedulerProc(server_dir).start()
    make.procs.append(proc)
    return proc


def start_worker(make, server_dir: ServerDir, run_s: float = 0.0) -> StandInWorker:
    worker = StandInWorker(server_dir, run_s=run_s).start()
    make.workers.append(worker)
    return worker


def scheduled(run) -> dt.datetime:
    return parse_iso(run.scheduled_at)


def assert_unique(ids: list[str]) -> None:
    assert len(ids) == len(set(ids)), f"a firing ran twice: {ids}"


def test_interval_job_fires_on_its_grid(server):
    sd = server({"jobs": job_toml("tick", type="interval", seconds=1, payload={"n": 7})})
    proc = start_scheduler(server, sd)
    worker = start_worker(server, sd)
    wait_until(lambda: len(worker.runs) >= 3, 10, message="three runs")
    state = sd.state("tick")
    defined_at = parse_iso(state["defined_at"])
    times = [scheduled(r) for r in worker.runs]
    # The first run is one interval after the job was defined, then one a second.
    assert abs((times[0] - defined_at).total_seconds() - 1.0) < 0.01
    assert all(abs((b - a).total_seconds() - 1.0) < 0.01 for a, b in itertools.pairwise(times))
    assert all(r.payload == {"n": 7} for r in worker.runs)
    assert all(r.started - scheduled(r).timestamp() < 0.5 for r in worker.runs)
    assert_unique(worker.firing_ids())
    assert parse_iso(state["next_run"]) > times[-1]
    assert proc.is_active()

    config = load_server_config(sd.path)
    definitions = merge_units([(u.name, u.content) for u in sd.odb.current(UNIT)])
    status = collect_status(sd.client, sd.keys, config, definitions)["scheduler"]
    assert status["active"] and status["alive"] and status["pid"] == proc.pid
    [job] = status["jobs"]
    assert job["runs"] >= 3 and job["missed"] == 0 and not job["stale"]
    assert (sd.path / "logs" / "scheduler.log").exists()

    assert proc.terminate() == 0
    assert sd.client.get(sd.keys.scheduler_lease) is None  # released on stop


def test_hot_deploy_pauses_resumes_changes_and_removes(server):
    sd = server({"jobs": job_toml("tick", type="interval", seconds=1)})
    start_scheduler(server, sd)
    worker = start_worker(server, sd)
    wait_until(lambda: len(worker.runs) >= 2, 10, message="runs before pausing")

    sd.deploy("jobs", job_toml("tick", type="interval", seconds=1, paused=True))
    wait_until(lambda: sd.state("tick").get("paused") == "1", 5, message="paused")
    time.sleep(0.3)  # a firing dispatched just before the pause may still be running
    paused_at = len(worker.runs)
    time.sleep(2.5)
    assert len(worker.runs) == paused_at
    assert sd.state("tick").get("next_run") == ""

    sd.deploy("jobs", job_toml("tick", type="interval", seconds=1))
    wait_until(lambda: len(worker.runs) >= paused_at + 2, 6, message="runs after resuming")
    assert int(sd.state("tick").get("missed", 0)) == 0  # a pause is not a miss

    sd.deploy("jobs", job_toml("tick", type="interval", seconds=2, payload={"v": 2}))
    wait_until(lambda: any(r.payload == {"v": 2} for r in worker.runs), 8, message="changed job")
    wait_until(lambda: sum(r.payload == {"v": 2} for r in worker.runs) >= 2, 8,
               message="two runs of the changed job")
    changed = [scheduled(r) for r in worker.runs if r.payload == {"v": 2}]
    assert abs((changed[1] - changed[0]).total_seconds() - 2.0) < 0.01

    sd.deploy("jobs", job_toml("other", type="interval", seconds=60))  # tick removed
    wait_until(lambda: "sig" not in sd.state("tick"), 5, message="tick removed")
    removed_at = len(worker.runs)
    time.sleep(2.5)
    assert len(worker.runs) == removed_at
    assert_unique(worker.firing_ids())


def test_one_time_and_repeats(server):
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    units = {"jobs": job_toml("once", type="one_time", start_date=soon.isoformat())
             + job_toml("thrice", type="interval", seconds=1, repeats=3)}
    sd = server(units)
    start_scheduler(server, sd)
    worker = start_worker(server, sd)
    wait_until(lambda: len(worker.firing_ids("thrice")) >= 3 and worker.firing_ids("once"), 10,
               message="one_time run and three repeats")
    time.sleep(2.0)
    assert len(worker.firing_ids("once")) == 1
    assert len(worker.firing_ids("thrice")) == 3
    assert sd.state("thrice")["next_run"] == ""
    assert sd.state("once")["next_run"] == ""


def test_overlap_skip_and_wait(server):
    units = {"jobs": job_toml("skipper", type="interval", seconds=1, on_overlap="skip")
             + job_toml("waiter", type="interval", seconds=1, on_overlap="wait")}
    sd = server(units)
    start_scheduler(server, sd)
    worker = start_worker(server, sd, run_s=2.2)
    # One stand-in worker runs one message at a time; two jobs share it, so use both to
    # read what the scheduler decided rather than how fast the worker got to it.
    wait_until(lambda: int(sd.state("skipper").get("missed", 0)) >= 2, 15,
               message="overlapping firings of skipper skipped")
    wait_until(lambda: len(worker.firing_ids("waiter")) >= 2, 20, message="waiter ran twice")
    for name in ("skipper", "waiter"):
        ids = worker.firing_ids(name)
        assert_unique(ids)
    # 'wait' never counts a miss for the firing that waits; at most one waits at a time.
    waiter_runs = [r for r in worker.runs if r.job == "waiter"]
    assert all(b.started - a.started >= 2.2 for a, b in itertools.pairwise(waiter_runs))


def two_schedulers(make):
    """A 1 s job, an active scheduler and a standby with a heartbeat."""
    sd = make({"jobs": job_toml("tick", type="interval", seconds=1)})
    first = start_scheduler(make, sd)
    wait_until(first.is_active, 10, message="first scheduler active")
    second = start_scheduler(make, sd)
    wait_until(second.instance, 10, message="second scheduler heartbeat")
    return sd, first, second


def active_and_standby(make):
    """Two schedulers and a worker that ran the job twice under the active one."""
    sd, first, second = two_schedulers(make)
    worker = start_worker(make, sd)
    wait_until(lambda: len(worker.runs) >= 2, 10, message="runs under the first scheduler")
    return sd, first, second, worker


def test_failover_to_the_standby_after_kill_9(server):
    sd, first, second, worker = active_and_standby(server)
    assert not second.is_active()

    first.kill()
    killed_at = time.time()
    before = len(worker.runs)
    wait_until(lambda: len(worker.runs) > before, 6, message="a run under the standby")
    taken_over = next(r for r in worker.runs[before:])
    assert taken_over.started - killed_at < 5.0
    assert second.is_active()
    wait_until(lambda: len(worker.runs) >= before + 3, 6, message="more runs")
    assert_unique(worker.firing_ids())
    assert f"{second.instance()} holds the lease: active" in second.log()


def test_graceful_stop_hands_over_at_once(server):
    _sd, first, second = two_schedulers(server)
    assert first.terminate() == 0
    stopped_at = time.monotonic()
    wait_until(second.is_active, 3, message="standby active after a graceful stop")
    assert time.monotonic() - stopped_at < 1.5


@pytest.mark.parametrize("grace_s", [30, 0])
def test_restart_after_kill_9_applies_the_misfire_policy(server, grace_s):
    sd = server({"jobs": job_toml("tick", type="interval", seconds=1,
                                  misfire_grace_s=grace_s)})
    proc = start_scheduler(server, sd)
    worker = start_worker(server, sd)
    wait_until(lambda: len(worker.runs) >= 2, 10, message="runs before the kill")
    proc.kill()
    time.sleep(3.5)
    before = len(worker.runs)
    last_before = scheduled(worker.runs[-1])
    restarted = start_scheduler(server, sd)
    wait_until(lambda: len(worker.runs) >= before + 2, 10, message="runs after the restart")
    runs = list(worker.runs)
    missed = int(sd.state("tick").get("missed", 0))
    assert_unique([r.firing_id for r in runs])
    # Every firing of the grid since the last run before the kill either ran or was
    # counted missed: none silently lost, none twice.
    span = (scheduled(runs[-1]) - last_before).total_seconds()
    assert abs(span - round(span)) < 0.01  # the grid did not move
    assert len(runs) - before + missed == round(span)
    assert missed >= 2
    log = restarted.log()
    if grace_s:
        # What fell due while down ran once, late, in place of all of it.
        assert re.search(r"job tick: \d+ firing\(s\) missed \(0 past the 30 s grace, \d+ "
                         r"coalesced", log), log
    else:
        assert re.search(r"job tick: \d+ firing\(s\) missed \(\d+ past the 0 s grace, 0 "
                         r"coalesced", log), log


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    jobs_cli.add_parser(parser.add_subparsers())
    return jobs_cli.run(parser.parse_args(["jobs", *argv]))


def test_cli_lists_jobs_and_runs_one_now(server, capsys):
    sd = server({"jobs": job_toml("hourly", type="interval", hours=1)
                 + job_toml("held", type="interval", hours=1, paused=True)})
    proc = start_scheduler(server, sd)
    worker = start_worker(server, sd)
    wait_until(proc.is_active, 10, message="scheduler active")
    wait_until(lambda: sd.state("hourly").get("next_run"), 5, message="next run recorded")

    assert run_cli(str(sd.path)) == 0
    table = capsys.readouterr().out
    assert "hourly" in table and "held" in table and "paused" in table

    assert run_cli(str(sd.path), "run", "hourly", "--json") == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["outcome"] == "dispatched"
    wait_until(lambda: worker.firing_ids("hourly") == [reply["firing_id"]], 5,
               message="the manual firing ran")
    wait_until(lambda: int(sd.state("hourly").get("runs", 0)) == 1, 5, message="run recorded")

    assert run_cli(str(sd.path), "run", "nosuch") == 1
    assert "unknown_job" in capsys.readouterr().err

    proc.terminate()
    assert run_cli(str(sd.path), "run", "hourly", "--timeout", "1") == 1
    assert "no active scheduler" in capsys.readouterr().err
    assert sd.client.llen(sd.keys.scheduler_commands) == 0  # withdrawn


def test_a_frozen_active_scheduler_is_replaced_and_cannot_dispatch_when_thawed(server):
    sd, first, second, worker = active_and_standby(server)

    os.kill(first.pid, signal.SIGSTOP)
    try:
        wait_until(second.is_active, 6, message="the standby took over from the frozen one")
        time.sleep(2)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    # Thawed, the first one finds its lease gone: it stands by and dispatches nothing.
    wait_until(lambda: f"{first.instance()} is standby" in first.log(), 5,
               message="the thawed scheduler stands by")
    before = len(worker.runs)
    wait_until(lambda: len(worker.runs) >= before + 3, 6, message="runs go on")
    assert second.is_active() and not first.is_active()
    assert_unique(worker.firing_ids())


def test_status_reports_no_active_scheduler_while_it_is_down(server):
    sd = server({"jobs": job_toml("tick", type="interval", seconds=1)})
    proc = start_scheduler(server, sd)
    wait_until(proc.is_active, 10, message="scheduler active")
    config = load_server_config(sd.path)
    definitions = merge_units([(u.name, u.content) for u in sd.odb.current(UNIT)])

    def problems() -> list[str]:
        return collect_status(sd.client, sd.keys, config, definitions)["problems"]

    assert "no scheduler is active" not in problems()
    proc.kill()
    wait_until(lambda: "no scheduler is active" in problems(), 6,
               message="status notices the dead scheduler")
    start_scheduler(server, sd)
    wait_until(lambda: "no scheduler is active" not in problems(), 10,
               message="status sees the scheduler back")


def test_a_firing_sent_again_is_not_dispatched_twice(server):
    """A pipeline whose reply was lost is sent again (redis-py retries it): the fenced
    dispatch script answers "duplicate" for a firing already on the stream or run, so the
    real consumer, which runs every new entry, runs each firing once."""
    sd = server({"jobs": job_toml("tick", type="interval", seconds=1)})
    proc = start_scheduler(server, sd)
    worker = start_worker(server, sd)
    wait_until(lambda: len(worker.runs) >= 2, 10, message="runs before the resend")
    job = merge_units([(u.name, u.content) for u in sd.odb.current(UNIT)]).jobs["tick"]
    # The scheduler's own script, under its own instance id, with what it sent before.
    state = JobState(sd.client, sd.keys, proc.instance())
    resent = worker.runs[-2:]
    before = len(worker.runs)
    outcomes = [
        parse_outcome(state.dispatch(firing_message(job, run.firing_id, scheduled(run)),
                                     scheduled(run), on_overlap=job.on_overlap, next_run=KEEP))
        for run in resent
    ]
    wait_until(lambda: len(worker.runs) >= before + 2, 6, message="the schedule goes on")
    assert_unique(worker.firing_ids())
    assert [o.kind for o in outcomes] == ["duplicate", "duplicate"]


def test_the_stand_in_worker_runs_a_duplicated_stream_entry_twice(server):
    """What the tests above rely on: an entry the stream holds twice runs twice, and
    assert_unique says so (a done-marker check would hide it)."""
    sd = server({"jobs": job_toml("tick", type="interval", seconds=1)})
    start_scheduler(server, sd)
    worker = start_worker(server, sd)
    wait_until(lambda: len(worker.runs) >= 1, 10, message="a first run")
    first = worker.runs[0]
    wait_until(lambda: int(sd.state("tick").get("runs", 0)) >= 1, 5, message="its run recorded")
    job = merge_units([(u.name, u.content) for u in sd.odb.current(UNIT)]).jobs["tick"]
    fields = firing_message(job, first.firing_id, scheduled(first)).to_fields()
    sd.client.xadd(sd.keys.dispatch, fields)
    wait_until(lambda: worker.firing_ids().count(first.firing_id) == 2, 6,
               message="the duplicated entry ran again")
    with pytest.raises(AssertionError, match="a firing ran twice"):
        assert_unique(worker.firing_ids())
