"""The launcher's children: one that keeps dying is reported and restarted ever more slowly."""

from __future__ import annotations

import json
import os
import signal
import time

from esb.launcher.children import CRASH_LOOP_EXITS
from esb.observe.retry import CHILD_RESTART
from tests.helpers import esb, pid_alive, wait_until


def test_a_scheduler_that_keeps_dying_is_reported_and_restarted_at_the_ceiling(esb_server):
    server = esb_server()
    facts_file = server.directory / "run" / "supervision.json"

    def scheduler() -> dict:
        facts = json.loads(facts_file.read_text())
        return next(child for child in facts["children"] if child["name"] == "scheduler")

    killed: list[int] = []

    def kill_each_new_scheduler() -> None:
        """Kill each new scheduler once it has logged something, so it has last words."""
        pid = scheduler()["pid"]
        if pid not in killed and pid_alive(pid) and f"[{pid}]" in server.log("scheduler.log"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    def killed_enough() -> bool:
        kill_each_new_scheduler()
        return len(killed) >= CRASH_LOOP_EXITS and scheduler()["crash_looping"]

    # Five quick deaths: restarted after 0.5, 1.5, 2.5 and 3.5 s, then at the ceiling.
    wait_until(killed_enough, timeout_s=60, interval_s=0.05, message="five deaths of the scheduler")

    status = esb("status", str(server.directory), "--json")
    assert status.returncode != 0
    problems = json.loads(status.stdout)["problems"]
    assert any(p.startswith("scheduler keeps dying") and "killed by SIGKILL" in p for p in problems), problems
    text = esb("status", str(server.directory))
    assert text.returncode != 0 and "scheduler keeps dying" in text.stdout
    # The launcher's log names it once, with what it wrote last (its own log's lines).
    [report] = [line for line in server.log("fg.log").split(" ERROR ") if "keeps dying" in line]
    assert report.startswith(f"[{server.proc.pid}] esb.launcher.supervisor"), report
    assert f"scheduler (pid {killed[CRASH_LOOP_EXITS - 1]}) keeps dying" in report, report
    last_words = report.split("Its last output:", 1)[1]
    assert f"[{killed[CRASH_LOOP_EXITS - 1]}]" in last_words, report

    # From now on it is started again at the ceiling (30 s), not twice a second: over a
    # window of 10 s, the old launcher would have started it about fifteen times.
    restarts_before = scheduler()["restarts"]
    window_end = time.monotonic() + 10
    while time.monotonic() < window_end:
        kill_each_new_scheduler()
        time.sleep(0.1)
    assert scheduler()["restarts"] - restarts_before <= 1

    # Left alone, it comes back at the ceiling and takes the lease again.
    wait_until(lambda: scheduler()["running"] and scheduler()["pid"] not in killed,
               timeout_s=CHILD_RESTART.interval_max_s + 15, message="the scheduler started again")
    wait_until(lambda: server.status()["scheduler"]["active"], timeout_s=30,
               message="the restarted scheduler active")
