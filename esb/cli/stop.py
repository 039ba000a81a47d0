"""`esb stop DIR`: a graceful stop that returns only once every process is gone.

It signals only processes that are still the ones esb started (``run/esb.pid`` and
``run/children.json`` record each pid with its start time): a pid reused by another
process after a kill -9 of the launcher is never signalled, and the stale file is removed
with a line saying so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from esb.cli.common import FAILURE, OK, load_or_exit
from esb.launcher import Recorded, children_file, read_children_file, running_launcher

STOP_TIMEOUT_S = 60


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stop", help="stop the server gracefully")
    p.add_argument("directory")
    p.set_defaults(handler=run)


def _wait_gone(processes: list[Recorded], timeout_s: float) -> list[Recorded]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        processes = [p for p in processes if p.is_running()]
        if not processes:
            return []
        time.sleep(0.1)
    return processes


def _signal(process: Recorded, signum: int) -> None:
    """Signal PROCESS only if it still is the process esb started."""
    if process.is_running():
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    launcher, stale = running_launcher(config)
    for line in stale:
        print(f"esb: {line}")
    children = [rec for rec in read_children_file(children_file(config)).values() if rec.is_running()]
    if launcher is None and not children:
        children_file(config).unlink(missing_ok=True)
        print(f"esb: nothing is running in {config.directory}")
        return OK
    # Without a launcher (killed -9), its children are asked to stop themselves.
    for process in [launcher] if launcher is not None else children:
        _signal(process, signal.SIGTERM)
    left = _wait_gone([p for p in [launcher, *children] if p], STOP_TIMEOUT_S)
    if left:
        # The launcher is gone or stuck; what it started must not outlive this command.
        for process in left:
            _signal(process, signal.SIGKILL)
        left = _wait_gone(left, 5)
    if left:
        print(f"esb: processes still running: {[p.pid for p in left]}", file=sys.stderr)
        return FAILURE
    if launcher is None:
        children_file(config).unlink(missing_ok=True)  # no launcher is left to remove it
    print(f"esb: stopped {config.directory}")
    return OK
