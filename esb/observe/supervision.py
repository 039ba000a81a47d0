"""What the launcher knows about the processes it supervises, where ``esb status`` reads it.

The launcher writes one JSON file, ``DIR/run/supervision.json``, whenever a child starts
or exits; status reads it. A file rather than a heartbeat in Redis, because the child that
keeps dying may be the embedded Redis itself. The facts of a launcher that is no longer
running are not shown: they would describe processes that are gone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE_NAME = "supervision.json"


def facts_path(run_dir: Path) -> Path:
    return run_dir / FILE_NAME


def write_facts(run_dir: Path, facts: dict[str, Any]) -> None:
    """Replace the file whole (write, then rename), so a reader never sees half of it."""
    path = facts_path(run_dir)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(facts, indent=1))
    os.replace(partial, path)


def pid_is_running(pid: object) -> bool:
    """True while PID exists and is not a zombie (a zombie has exited; only reaping remains)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_facts(run_dir: Path) -> dict[str, Any] | None:
    """The running launcher's facts, or None (no launcher, or a file it left behind)."""
    try:
        facts = json.loads(facts_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(facts, dict) or not pid_is_running(facts.get("launcher_pid")):
        return None
    return facts


def problems(facts: dict[str, Any] | None) -> list[str]:
    """One line per child that keeps dying, naming it and its last exit."""
    if not facts:
        return []
    return [
        f"{child['name']} keeps dying ({facts.get('crash_exits')} exits within "
        f"{facts.get('crash_window_s'):.0f} s; the last one {child['last_exit']} at "
        f"{child['last_exit_at']}); started again every {facts.get('restart_ceiling_s'):.0f} s"
        for child in facts.get("children", [])
        if child.get("crash_looping")
    ]
