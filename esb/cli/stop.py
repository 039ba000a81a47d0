"""`esb stop DIR`: a graceful stop that returns only once every process is gone."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from esb.cli.common import FAILURE, OK, load_or_exit
from esb.launcher import children_file, pid_is_running, running_launcher_pid

STOP_TIMEOUT_S = 60


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stop", help="stop the server gracefully")
    p.add_argument("directory")
    p.set_defaults(handler=run)


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [pid for pid in pids if pid_is_running(pid)]
        if not pids:
            return []
        time.sleep(0.1)
    return pids


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    try:
        children = list(json.loads(children_file(config).read_text()).values())
    except (OSError, ValueError):
        children = []
    launcher = running_launcher_pid(config)
    if launcher is None and not any(pid_is_running(pid) for pid in children):
        print(f"esb: nothing is running in {config.directory}")
        return OK
    if launcher is not None:
        os.kill(launcher, signal.SIGTERM)
    left = _wait_gone([p for p in [launcher, *children] if p], STOP_TIMEOUT_S)
    if left:
        # The launcher is gone or stuck; what it started must not outlive this command.
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = _wait_gone(left, 5)
    if left:
        print(f"esb: processes still running: {left}", file=sys.stderr)
        return FAILURE
    print(f"esb: stopped {config.directory}")
    return OK
