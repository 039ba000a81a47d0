"""``run/esb.pid`` and ``run/children.json``: pids with a proof of identity.

A pid alone names whichever process has it now; after a kill -9 of the launcher and a
reboot or a busy night, that can be anybody's process. Each pid is therefore written with
the process's start time (``/proc/<pid>/stat`` field 22, clock ticks since boot), and a
recorded pid counts as esb's only while the process having it started at that moment.
``esb start`` and ``esb stop`` act on nothing else, and remove stale files with a line
saying so.

A record without a start time (an older esb wrote only the pid) proves nothing by
itself: it counts as esb's only while ``/proc/<pid>/cmdline`` shows an esb process of
this very server directory (for ``esb.pid``: an ``esb start`` of it). Anything else that
got the pid is never signalled.

``esb.pid`` holds ``PID START`` on one line. ``children.json`` maps each child's name to
its pid (as it always did, so readers by name keep working) and ``start_times`` to a map
of name to start time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from esb.launcher.children import process_start_time
from esb.observe.supervision import pid_is_running

START_TIMES = "start_times"
# How an esb command or process names itself in its argv: the console script, or the
# module run with -m (the launcher, the arbiter, the scheduler).
_ESB_MODULES = frozenset({"esb.cli", "esb.server", "esb.scheduler"})


@dataclass(frozen=True)
class Recorded:
    """A pid as a pid file recorded it, with the start time it had then (None: not recorded)."""

    pid: int
    start_time: int | None
    # Where the record was read, for one without a start time: the server directory its
    # process must name, and whether it must be that directory's launcher (esb start).
    directory: Path | None = None
    is_launcher: bool = False

    def is_running(self) -> bool:
        """True while the recorded process itself runs (not another that got its pid)."""
        if not pid_is_running(self.pid):
            return False
        if self.start_time is None:
            # Written before start times were recorded: the pid counts only for a process
            # that shows itself as esb's, of this directory.
            return self.directory is not None and is_esb_of(self.pid, self.directory, self.is_launcher)
        now = process_start_time(self.pid)
        return now is None or now == self.start_time  # no /proc: cannot tell, trust the pid

    def why_stale(self) -> str:
        """Why this record no longer names esb's process (call when is_running() is False)."""
        return f"pid {self.pid} is another process" if pid_is_running(self.pid) else f"pid {self.pid} is gone"


def is_esb_of(pid: int, directory: Path, is_launcher: bool) -> bool:
    """True when PID's command line is an esb process of DIRECTORY (``esb start DIRECTORY``
    when IS_LAUNCHER); never this process itself."""
    if pid == os.getpid():
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    except OSError:
        return False
    is_esb = any(a in _ESB_MODULES or Path(a).name == "esb" for a in args)
    target = directory.resolve()
    cwd = Path(f"/proc/{pid}/cwd")
    names_directory = False
    for arg in args:
        try:
            names_directory = names_directory or (cwd / arg).resolve() == target
        except (OSError, RuntimeError):
            continue
    return is_esb and names_directory and (not is_launcher or "start" in args)


def record_of(pid: int) -> Recorded:
    """PID as it is now, to be written down."""
    return Recorded(pid, process_start_time(pid))


def write_pid_file(path: Path, pid: int) -> None:
    start = process_start_time(pid)
    path.write_text(f"{pid} {'' if start is None else start}".rstrip() + "\n")


def read_pid_file(path: Path) -> Recorded | None:
    """The record in PATH; None when there is none or it cannot be read."""
    try:
        parts = path.read_text().split()
        start = int(parts[1]) if len(parts) > 1 else None
        return Recorded(int(parts[0]), start, directory=_server_directory(path), is_launcher=True)
    except (OSError, ValueError, IndexError):
        return None


def write_children_file(path: Path, children: dict[str, Recorded]) -> None:
    content: dict[str, object] = {name: rec.pid for name, rec in children.items()}
    content[START_TIMES] = {name: rec.start_time for name, rec in children.items()}
    path.write_text(json.dumps(content))


def read_children_file(path: Path) -> dict[str, Recorded]:
    """Each child's record by name; empty when there is no readable file."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict):
        return {}
    starts = content.get(START_TIMES) or {}
    return {
        name: Recorded(int(pid), starts.get(name), directory=_server_directory(path))
        for name, pid in content.items()
        if name != START_TIMES and isinstance(pid, int)
    }


def _server_directory(path: Path) -> Path:
    """The server directory of a file in its run/."""
    return path.parent.parent


def check_launcher(pid_path: Path, children_path: Path) -> tuple[Recorded | None, list[str]]:
    """The running launcher's record (None if none), and one line per stale file removed.

    A pid file whose process is gone or is another process is stale; so is then the
    children file, except for children that are still the processes esb started (they are
    left in it for ``esb stop``, which may still end them).
    """
    notes: list[str] = []
    launcher = read_pid_file(pid_path)
    if launcher is not None and launcher.is_running():
        return launcher, notes
    if launcher is not None:
        pid_path.unlink(missing_ok=True)
        notes.append(f"stale {_shown(pid_path)} ({launcher.why_stale()}); removed")
    elif pid_path.exists():
        pid_path.unlink(missing_ok=True)
        notes.append(f"unreadable {_shown(pid_path)}; removed")
    children = read_children_file(children_path)
    if children_path.exists():
        live = {name: rec for name, rec in children.items() if rec.is_running()}
        if not live:
            children_path.unlink(missing_ok=True)
            reasons = ", ".join(f"{name}: {rec.why_stale()}" for name, rec in children.items())
            notes.append(f"stale {_shown(children_path)} ({reasons or 'no children'}); removed")
    return None, notes


def _shown(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"

