"""The launcher's restart bookkeeping: backoff, crash loops, the last output, recovery."""

import os
import subprocess
from pathlib import Path

from esb.launcher.children import (
    CRASH_LOOP_EXITS,
    CRASH_LOOP_WINDOW_S,
    STABLE_LIFE_S,
    Child,
    describe_exit,
)
from esb.observe import supervision
from esb.observe.retry import CHILD_RESTART


def dying_child(tmp_path: Path) -> Child:
    child = Child("scheduler", ["true"], tmp_path / "scheduler.stdout.log",
                  own_log=tmp_path / "scheduler.log")
    child.log_file.write_text("old run\n")
    child._offsets = {child.log_file: child.log_file.stat().st_size}
    return child


def test_restarts_back_off_then_stay_at_the_ceiling_once_it_keeps_dying(tmp_path):
    child = dying_child(tmp_path)
    now, delays = 1000.0, []
    for _ in range(CRASH_LOOP_EXITS + 2):
        child.started_at = now
        now += 0.1  # dies at once
        delays.append(child.exited(1, now))
        now += delays[-1]
    assert delays[0] < 2.0  # the architecture's "started again within 2 s"
    assert delays[: CRASH_LOOP_EXITS - 1] == sorted(delays[: CRASH_LOOP_EXITS - 1])
    assert delays[CRASH_LOOP_EXITS - 1:] == [CHILD_RESTART.interval_max_s] * 3
    assert child.crash_looping and child.last_exit == "exit code 1"


def test_a_run_that_lasts_ends_the_crash_loop(tmp_path):
    child = dying_child(tmp_path)
    now = 0.0
    for _ in range(CRASH_LOOP_EXITS):
        child.started_at = now
        now += child.exited(-9, now + 0.1) + 0.1
    assert child.crash_looping and child.last_exit == "killed by SIGKILL"
    child.started_at = now
    assert not child.settled(now + STABLE_LIFE_S)  # five deaths a minute still possible
    assert child.settled(now + CRASH_LOOP_WINDOW_S)
    assert not child.crash_looping and not child.settled(now + CRASH_LOOP_WINDOW_S + 1)
    # Its next death starts again from the first interval.
    assert child.exited(1, now + CRASH_LOOP_WINDOW_S + 2) == CHILD_RESTART.interval_start_s


def test_a_child_that_dies_every_few_runs_is_still_caught(tmp_path):
    child = dying_child(tmp_path)
    now = 0.0
    for _ in range(CRASH_LOOP_EXITS):
        child.started_at = now
        now += STABLE_LIFE_S + 1  # each run lasts a little, but five die within the window
        now += child.exited(1, now)
    assert child.crash_looping


def test_the_last_output_is_this_runs_own_log_then_its_stderr(tmp_path):
    child = dying_child(tmp_path)
    child.own_log.write_text("INFO scheduler starting\n")
    with open(child.log_file, "a") as out:
        out.write("Traceback (most recent call last):\nValueError: broken\n")
    child.exited(1, 5.0)
    assert child.last_output == ["INFO scheduler starting", "Traceback (most recent call last):",
                                 "ValueError: broken"]
    assert describe_exit(-15) == "killed by SIGTERM"


def test_status_reads_the_facts_of_a_running_launcher_only(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    facts = {"launcher_pid": gone.pid, "crash_exits": 5, "crash_window_s": 60.0, "restart_ceiling_s": 30.0,
             "children": [{"name": "redis", "crash_looping": True, "last_exit": "exit code 1",
                           "last_exit_at": "2030-01-01T00:00:00Z"}]}
    supervision.write_facts(tmp_path, facts)
    assert supervision.read_facts(tmp_path) is None  # no such launcher: its facts are old
    supervision.write_facts(tmp_path, facts | {"launcher_pid": os.getpid()})
    [problem] = supervision.problems(supervision.read_facts(tmp_path))
    assert problem.startswith("redis keeps dying") and "exit code 1" in problem
