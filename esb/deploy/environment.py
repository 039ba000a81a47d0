"""The server's environment, recorded at start, so a deploy is checked where it will run.

``$ENV{...}`` in definitions and ``os.environ`` in a module's import are resolved in the
environment of the workers, which is the launcher's (every child inherits it). ``esb
deploy`` runs in an operator's shell, which may hold other variables; it validates in the
environment the launcher recorded in ``run/server-env.json`` when it started. The file
holds whatever secrets that environment holds, so it is written with mode 0600.

Chosen over asking a server process to validate: a deploy then needs no running server,
and the validating process is started exactly like the one that checks pickup files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

FILE = "server-env.json"


def record_server_environment(run_dir: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Write the environment (by default this process's) to RUN_DIR, mode 0600, atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FILE
    temporary = run_dir / f".{FILE}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(dict(os.environ if environ is None else environ), out)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path


def server_environment(run_dir: Path) -> dict[str, str] | None:
    """The environment the server recorded at its last start, or None if it never did."""
    try:
        data = json.loads((run_dir / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {str(k): str(v) for k, v in data.items()}
