"""gunicorn's arbiter with one change of judgement: a worker that booted cannot halt it.

gunicorn halts the whole server when a worker exits 3 (could not boot) or 4 (could not
load the application), so that a broken deployment does not restart workers forever. In
esb, once a worker has loaded the application and reached ``post_worker_init``, whatever
happens later is user code or a fault of that one worker: a service calling
``os._exit(3)`` must cost one worker, not the server. Each worker leaves a marker file at
``post_worker_init`` (``booted_marker``); an exit 3 or 4 of a worker with a marker is
handled as an ordinary worker death and the worker is replaced. Without the marker,
gunicorn's halt stands: esb itself could not boot.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gunicorn.arbiter import Arbiter
from gunicorn.errors import HaltServer

logger = logging.getLogger(__name__)

HALT_CODES = (Arbiter.WORKER_BOOT_ERROR, Arbiter.APP_LOAD_ERROR)


def booted_dir(run_dir: Path) -> Path:
    return run_dir / "booted"


def booted_marker(run_dir: Path, pid: int) -> Path:
    """Exists from a worker's post_worker_init until the arbiter has reaped it."""
    return booted_dir(run_dir) / str(pid)


def mark_booted(run_dir: Path, pid: int) -> None:
    directory = booted_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    booted_marker(run_dir, pid).touch()


def clear_booted(run_dir: Path, pid: int) -> bool:
    """Remove PID's marker; answers whether the worker had booted."""
    try:
        booted_marker(run_dir, pid).unlink()
    except FileNotFoundError:
        return False
    return True


class EsbArbiter(Arbiter):
    """gunicorn's Arbiter; ``reap_workers`` forgives boot-failure codes of booted workers,
    and ``is_stopping`` tells the child_exit hook that deaths are asked for."""

    def __init__(self, app):
        super().__init__(app)
        self.is_stopping = False
        self.run_dir: Path = app.config.run_dir
        # Markers of a previous arbiter's workers mean nothing to this one.
        directory = booted_dir(self.run_dir)
        if directory.is_dir():
            for stale in directory.iterdir():
                stale.unlink(missing_ok=True)

    def stop(self, graceful: bool = True) -> None:
        self.is_stopping = True
        super().stop(graceful)

    def reap_workers(self) -> None:
        """gunicorn's reaping; when it halts on a booted worker's exit 3 or 4, that worker
        is given the ordinary end of a dead worker instead and reaping goes on.

        The worker gunicorn halted on is the one it removed from WORKERS without calling
        child_exit (the hook sets ``worker.is_reaped``).
        """
        while True:
            before = dict(self.WORKERS)
            try:
                super().reap_workers()
                return
            except HaltServer as exc:
                if exc.exit_status not in HALT_CODES:
                    raise
                culprits = [
                    w
                    for pid, w in before.items()
                    if pid not in self.WORKERS and not getattr(w, "is_reaped", False)
                ]
                if len(culprits) != 1 or not booted_marker(self.run_dir, culprits[0].pid).exists():
                    raise
                worker = culprits[0]
                logger.error(
                    "worker %d exited %d after it had booted: its code was chosen by what it ran, "
                    "not by a failed boot; it is replaced like any dead worker",
                    worker.pid,
                    exc.exit_status,
                )
                worker.tmp.close()
                self.cfg.child_exit(self, worker)
