"""`esb start DIR [--fg]`: run the server; in the background, return once it answers."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from esb.cli.common import FAILURE, OK, load_or_exit, ping_answer
from esb.config.secrets import keep_private
from esb.launcher import ROLES, Launcher, StartError, running_launcher
from esb.observe import setup_logging

START_TIMEOUT_S = 90
# How often /esb/ping is asked while the server starts: each poll is a connection
# refused or one small request, and a coarser poll added its half to every start.
PING_POLL_S = 0.02


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("start", help="start the server")
    p.add_argument("directory")
    p.add_argument("--fg", action="store_true", help="stay in the foreground")
    p.add_argument("--only", choices=ROLES, help="run only this part (e.g. a scheduler host)")
    p.add_argument("--no-scheduler", action="store_true", help="run no scheduler here")
    p.set_defaults(handler=run)


def roles_of(args: argparse.Namespace) -> tuple[str, ...]:
    if args.only:
        return (args.only,)
    return tuple(r for r in ROLES if not (r == "scheduler" and args.no_scheduler))


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    changed = keep_private(config.directory, config.odb_url)
    if changed:
        print(f"esb: made {len(changed)} file(s) of {config.directory} readable by their owner only")
    if args.fg:
        setup_logging(None, level=config.logging.level, as_json=config.logging.json)
        try:
            return Launcher(config, roles_of(args)).run()
        except StartError as exc:
            print(f"esb: {exc}", file=sys.stderr)
            return FAILURE
    running, stale = running_launcher(config)
    for line in stale:
        print(f"esb: {line}")
    if running is not None:
        print(f"esb: already running in {config.directory} (pid {running.pid})", file=sys.stderr)
        return FAILURE
    config.log_dir.mkdir(parents=True, exist_ok=True)
    launcher_log = config.log_dir / "launcher.log"
    # -P: no module of the caller's working directory may shadow one esb imports.
    argv = [sys.executable, "-P", "-m", "esb.cli", "start", str(config.directory), "--fg"]
    if args.only:
        argv += ["--only", args.only]
    if args.no_scheduler:
        argv.append("--no-scheduler")
    with open(launcher_log, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    needs_http = "server" in roles_of(args)
    not_ready = None  # what a worker that is not ready answered last
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"esb: the server did not start:\n{_tail(launcher_log, offset)}", file=sys.stderr)
            return FAILURE
        answer = ping_answer(config, timeout_s=1.0) if needs_http else None
        if answer:
            not_ready = answer
        if answer == "" or (
            not needs_http and time.monotonic() > deadline - START_TIMEOUT_S + 2
        ):
            print(f"esb: started {config.directory} (pid {proc.pid})")
            return OK
        time.sleep(PING_POLL_S)
    said = f"the last: {not_ready}" if not_ready else "no answer"
    print(
        f"esb: /esb/ping did not answer 200 within {START_TIMEOUT_S} s ({said}); the server keeps "
        f"trying (esb stop ends it); see {launcher_log} and server.log",
        file=sys.stderr,
    )
    return FAILURE


def _tail(path, offset: int, lines: int = 15) -> str:
    with open(path, "rb") as log:
        log.seek(offset)
        text = log.read().decode("utf-8", "replace")
    return "\n".join(text.strip().splitlines()[-lines:]) or f"(nothing logged; see {path})"
