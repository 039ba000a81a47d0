"""A 1 s interval job keeps firing, once per firing, through kill -9 of the workers that run
it and of the scheduler itself (real `esb start`, real workers, real Redis)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from pathlib import Path

import pytest

from esb.bus import parse_iso
from tests.helpers import pid_alive, wait_until

SERVICE = '''
import json
import os
import time

from esb import Service


class Tick(Service):
    """Records every run in Redis: which firing, when it was due, who ran it, when."""

    name = "t.sched-tick"

    def handle(self):
        job = self.request.job
        self.redis.rpush(self.request.payload["key"], json.dumps({
            "firing_id": job.firing_id, "scheduled_at": job.scheduled_at,
            "pid": os.getpid(), "started": time.time(),
        }))
'''

JOB = '''
[[scheduler.job]]
name = "fault-tick"
service = "t.sched-tick"
type = "interval"
seconds = 1
payload = {{ key = "{key}" }}
'''


def deploy(server, tmp_path: Path, key: str) -> None:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    (files / "schedfaults.py").write_text(SERVICE)
    (files / "schedfaults.toml").write_text(JOB.format(key=key))
    done = server.deploy(files / "schedfaults.py", files / "schedfaults.toml")
    assert done.returncode == 0, done.stdout + done.stderr


def runs(redis_client, key: str) -> list[dict]:
    return [json.loads(item) for item in redis_client.lrange(key, 0, -1)]


def assert_no_firing_lost_or_repeated(recorded: list[dict], max_gap_s: float) -> None:
    ids = [r["firing_id"] for r in recorded]
    assert len(ids) == len(set(ids)), f"a firing ran twice: {ids}"
    due = sorted(parse_iso(r["scheduled_at"]) for r in recorded)
    steps = [(b - a).total_seconds() for a, b in zip(due, due[1:], strict=False)]
    assert all(abs(step - 1.0) < 0.01 for step in steps), f"firings lost: steps {steps}"
    starts = sorted(r["started"] for r in recorded)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert max(gaps) <= max_gap_s, f"gap of {max(gaps):.2f} s between runs"


@pytest.mark.slow
def test_job_survives_kill_9_of_the_workers_that_run_it(esb_server, redis_client, cluster,
                                                        tmp_path):
    server = esb_server(workers=2)
    key = f"esb:{cluster}:test:sched-runs"
    deploy(server, tmp_path, key)
    wait_until(lambda: len(runs(redis_client, key)) >= 3, 15, message="the job runs")
    started = time.monotonic()

    for _ in range(2):
        victim = runs(redis_client, key)[-1]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda v=victim: not pid_alive(v), 10, message="the worker died")
        count = len(runs(redis_client, key))
        wait_until(lambda c=count: len(runs(redis_client, key)) >= c + 3, 15,
                   message="the job goes on after the kill")
    remaining = 20 - (time.monotonic() - started)
    if remaining > 0:
        time.sleep(remaining)

    recorded = runs(redis_client, key)
    assert len(recorded) >= 20
    assert_no_firing_lost_or_repeated(recorded, max_gap_s=3.0)
    [job] = server.status()["scheduler"]["jobs"]
    assert job["missed"] == 0 and not job["stale"]


@pytest.mark.slow
def test_job_survives_kill_9_of_the_scheduler(esb_server, redis_client, cluster, tmp_path):
    server = esb_server(workers=2)
    key = f"esb:{cluster}:test:sched-runs"
    deploy(server, tmp_path, key)
    wait_until(lambda: len(runs(redis_client, key)) >= 3, 15, message="the job runs")

    scheduler = server.status()["scheduler"]
    assert scheduler["active"]
    os.kill(scheduler["pid"], signal.SIGKILL)
    killed_at = time.time()
    # The launcher starts it again within 2 s; it takes the lease once the old one lapses.
    wait_until(lambda: server.status()["scheduler"]["active"]
               and server.status()["scheduler"]["pid"] != scheduler["pid"], 15,
               message="a new scheduler is active")
    wait_until(lambda: any(r["started"] > killed_at + 0.5 for r in runs(redis_client, key)), 10,
               message="the job runs again")
    time.sleep(3)
    recorded = runs(redis_client, key)
    ids = [r["firing_id"] for r in recorded]
    assert len(ids) == len(set(ids)), f"a firing ran twice: {ids}"
    # What fell due while no scheduler held the lease ran once late (coalesced) or was
    # counted missed: every firing of the grid is accounted for.
    due = sorted(parse_iso(r["scheduled_at"]) for r in recorded)
    span = round((due[-1] - due[0]).total_seconds())
    [job] = server.status()["scheduler"]["jobs"]
    assert len(due) - 1 + job["missed"] == span
    assert (due[-1] - dt.datetime.now(dt.UTC)).total_seconds() < 2


@pytest.mark.slow
@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "data-lost"])
def test_scheduler_rides_out_a_redis_restart(private_redis, tmp_path, persistent):
    from tests.integration.scheduler_support import (
        SchedulerProc,
        StandInWorker,
        job_toml,
        make_server_dir,
        unique_cluster,
    )

    private_redis.start(persistent)
    sd = make_server_dir(tmp_path, unique_cluster(), redis_url=private_redis.url,
                         units={"jobs": job_toml("tick", type="interval", seconds=1)})
    proc = SchedulerProc(sd).start()
    worker = StandInWorker(sd).start()
    try:
        wait_until(lambda: len(worker.runs) >= 3, 15, message="runs before the outage")
        grid = parse_iso(worker.runs[0].scheduled_at)
        private_redis.kill()
        time.sleep(3)
        private_redis.start(persistent)
        back_at = time.time()
        before = len(worker.runs)
        wait_until(lambda: len(worker.runs) >= before + 3, 15, message="runs after the outage")
        recovered = [r for r in worker.runs[before:] if r.started >= back_at]
        assert recovered and recovered[0].started - back_at < 5
        ids = [r.firing_id for r in worker.runs]
        assert len(ids) == len(set(ids)), f"a firing ran twice: {ids}"
        # The schedule kept its grid through the outage, even when Redis lost everything.
        for run in worker.runs:
            offset = (parse_iso(run.scheduled_at) - grid).total_seconds()
            assert abs(offset - round(offset)) < 0.01
        assert proc.is_active()
        log = proc.log()
        assert "Redis unreachable: " in log and "holds the lease: active" in log
    finally:
        proc.kill()
        worker.stop()
        sd.close()
