"""Whether the workers of this server serve what is deployed: live, ready, nothing left out.

A worker is ready once it built a generation from the ODB; until then it answers every
channel 503 and says why in its heartbeat (``build_error``). A worker that serves a
generation without a unit that does not resolve in its environment names that unit
(``left_out_units``). Each is a problem, and so is a server with fewer live, ready
workers than its ``[main] workers``: a replacement that cannot build is not a worker.
"""

from __future__ import annotations

import socket
from typing import Any

from esb.config import ServerConfig


def readiness_problems(workers: list[dict[str, Any]], config: ServerConfig) -> list[str]:
    """One line per live worker not ready or serving without a unit, and one when this
    server has fewer live, ready workers than it should."""
    problems = []
    live = [w for w in workers if w["alive"]]
    for w in live:
        where = f"worker {w['host']}:{w['pid']}"
        if not w["ready"]:
            problems.append(
                f"{where} is not ready: it cannot build its generation ({w['build_error'] or 'starting'}); "
                "its channels answer 503 while it retries"
            )
        elif w["build_error"]:
            problems.append(
                f"{where} cannot build the ODB's newest generation ({w['build_error']}); "
                f"it serves generation {w['generation']} while it retries"
            )
        for unit in w["left_out_units"]:
            problems.append(
                f"{where} serves its generation without unit {unit}; "
                "set what it names in the server's environment and restart, or undeploy the unit"
            )
    # Counted only where this server runs workers: a directory that runs only a
    # scheduler (`esb start --only scheduler`) has none, whatever its [main] workers.
    host, directory = socket.gethostname(), str(config.directory)
    here = [w for w in live if w["host"] == host and w["server"] == directory]
    ready = [w for w in here if w["ready"]]
    expected = config.main.workers
    if here and len(ready) < expected:
        problems.append(
            f"{len(ready)} of the {expected} workers of {directory} ([main] workers) are live and ready"
        )
    return problems
