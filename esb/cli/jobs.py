"""`esb jobs DIR [--json]` lists scheduled jobs; `esb jobs DIR run NAME` fires one now.

A manual run is a request to the active scheduler (see ``esb/scheduler/commands.py``),
which dispatches it with a fresh firing id unless the job's previous run is still in
progress; the command prints the firing id, or why nothing was fired, and exits non-zero
in that case.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from redis.exceptions import RedisError

from esb.bus import Keys, make_redis
from esb.cli.common import BAD_CONFIG, FAILURE, OK, load_or_exit, print_json
from esb.config import merge_units
from esb.errors import BusUnavailable, ConfigError, OdbUnavailable
from esb.odb import UNIT, OdbStore
from esb.scheduler import request_run
from esb.status import job_rows

COLUMNS = ("name", "type", "next_run", "last_run", "runs", "missed", "stale")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "jobs", help="list scheduled jobs, or fire one now with: jobs DIR run NAME",
        description="Without an action, list every job with its next and last run. "
                    "'run NAME' asks the active scheduler to fire NAME now.",
    )
    p.add_argument("directory")
    p.add_argument("action", nargs="?", choices=["run"], help="run: fire NAME now")
    p.add_argument("name", nargs="?", help="the job to fire")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the active scheduler's answer (default 10)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "run" and not args.name:
        print("esb jobs: 'run' needs a job name: esb jobs DIR run NAME", file=sys.stderr)
        return BAD_CONFIG
    if args.action is None and args.name:
        print(f"esb jobs: unexpected argument {args.name!r}", file=sys.stderr)
        return BAD_CONFIG
    config = load_or_exit(args.directory)
    client = make_redis(config.redis_url, socket_timeout_s=3.0, retries=1)
    keys = Keys(config.main.cluster)
    if args.action == "run":
        return _run_now(client, keys, args)
    odb = OdbStore(config.odb_url)
    try:
        units = odb.current(UNIT)
        definitions = merge_units([(u.name, u.content) for u in units], environ=None)
    except (OdbUnavailable, ConfigError) as exc:
        print(f"esb jobs: cannot read the job definitions: {exc}", file=sys.stderr)
        return FAILURE
    finally:
        odb.dispose()
    try:
        jobs = job_rows(client, keys, definitions)
    except RedisError as exc:
        print(f"esb jobs: Redis unreachable: {exc}", file=sys.stderr)
        return FAILURE
    if args.json:
        print_json(jobs)
    else:
        print(render_table(jobs))
    return OK


def _run_now(client, keys: Keys, args: argparse.Namespace) -> int:
    try:
        reply = request_run(client, keys, args.name, timeout_s=args.timeout)
    except BusUnavailable as exc:
        print(f"esb jobs: {exc}", file=sys.stderr)
        return FAILURE
    if args.json:
        print_json({"outcome": reply.outcome, "firing_id": reply.firing_id,
                    "detail": reply.detail})
    elif reply.outcome == "dispatched":
        print(f"job {args.name}: dispatched firing {reply.firing_id}")
    else:
        print(f"job {args.name}: not fired ({reply.outcome}): {reply.detail}", file=sys.stderr)
    return OK if reply.outcome == "dispatched" else FAILURE


def render_table(jobs: list[dict[str, Any]]) -> str:
    def cell(job: dict[str, Any], column: str) -> str:
        value = job.get(column)
        if column == "next_run" and job.get("paused"):
            return "paused"
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    rows = [[column.upper().replace("_", " ") for column in COLUMNS]]
    rows += [[cell(job, column) for column in COLUMNS] for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
             for row in rows]
    if not jobs:
        lines.append("(no jobs defined)")
    return "\n".join(line.rstrip() for line in lines)
