"""The pickup watcher: the one thread per server that deploys files dropped into pickup/.

It is a thread of the launcher (``esb start``), of the launcher that carries the
``pickup`` role: there is one launcher per server directory (its pid file), so exactly
one watcher per server. ``esb start --only server`` or ``--only scheduler`` runs none;
``--only pickup`` runs the watcher alone. Each file is deployed by an
``esb.deploy.apply`` process (``run_apply``), so the launcher never imports the deploy
stack and stays small between deploys; the thread only scans the directory.

A file is taken only when it has stayed unchanged (inode, size, mtime) for
``[pickup] settle_s`` and no process holds it open for writing (read from /proc on
Linux). Why not inotify's close-write alone: it is not in the standard library, and a
writer that appends in several open-write-close rounds closes the file between parts,
so a quiet period is needed anyway; the /proc check adds what close-write would have
said, without a dependency. Writing the file elsewhere and renaming it into place is
still best: the rename is atomic, and the file is whole the moment it appears.

A deployed file moves to ``pickup/deployed/`` (the newest ``keep_deployed`` are kept), a
rejected one to ``pickup/rejected/`` with a ``.error`` file beside it saying why; the
operator's copy is never deleted unread. A file whose deploy process crashes or times out
is tried ``DEPLOY_TRIES`` times, then rejected with the last reason: the same text would
crash it again. Only an ODB that cannot be reached keeps a file waiting for as long as
it lasts. Symlinks are refused (moved to rejected/ as links, never followed). Hidden
files (``.name``) and other suffixes are left alone, so ``.orders.py.tmp`` can be
written in place and renamed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from esb.deploy.apply import ApplyResult, run_apply

logger = logging.getLogger(__name__)

POLL_S = 0.5
SUFFIXES = (".py", ".toml")
DEPLOYED = "deployed"
REJECTED = "rejected"
# Tries of a file whose deploy process crashed or timed out, before it is rejected.
DEPLOY_TRIES = 3

Signature = tuple[int, int, int]  # inode, size, mtime_ns


def open_for_writing() -> set[tuple[int, int]] | None:
    """(device, inode) of every file some process we may inspect holds open for writing;
    None where /proc does not tell (not Linux)."""
    proc = Path("/proc")
    if not (proc / "self" / "fdinfo").is_dir():
        return None
    found: set[tuple[int, int]] = set()
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = os.listdir(pid_dir / "fd")
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                st = os.stat(pid_dir / "fd" / fd)
                if not (st.st_mode & 0o170000 == 0o100000):
                    continue  # only regular files matter
                flags = next(
                    line.split()[1]
                    for line in (pid_dir / "fdinfo" / fd).read_text().splitlines()
                    if line.startswith("flags:")
                )
            except (OSError, StopIteration, IndexError):
                continue
            if int(flags, 8) & 0o3 in (os.O_WRONLY, os.O_RDWR):
                found.add((st.st_dev, st.st_ino))
    return found


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")


Deploy = Callable[[str, str], ApplyResult]  # (file name, text) -> what the deploy answered


def deploy_in_process(server_directory: Path) -> Deploy:
    """The watcher's deploy: one ``esb.deploy.apply`` process per file, for that server."""

    def deploy(filename: str, text: str) -> ApplyResult:
        return run_apply(server_directory, ["--file", filename], stdin_text=text)

    return deploy


class PickupWatcher:
    """Scans DIRECTORY every POLL_S; hands each settled file to DEPLOY, then moves it."""

    def __init__(self, directory: Path, deploy: Deploy, *, settle_s: float = 3.0, keep_deployed: int = 20):
        self.directory = directory
        self.deploy = deploy
        self.settle_s = settle_s
        self.keep_deployed = keep_deployed
        # name -> (signature, monotonic time it was first seen with that signature)
        self._seen: dict[str, tuple[Signature, float]] = {}
        # name -> (signature, failed deploy processes of that version of the file)
        self._failures: dict[str, tuple[Signature, int]] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle: a thread of the launcher ------------------------------------------

    def start(self) -> None:
        """Watch in a daemon thread of this process."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self.run_forever, name="esb-pickup", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the file in hand, if any (its deploy is not cut short); wait for the
        thread at most TIMEOUT_S (0: only ask)."""
        self._stopping.set()
        if self._thread is not None and timeout_s > 0:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("pickup: a deploy still runs after %.0f s; the launcher does not wait for it",
                               timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- which files are ready ---------------------------------------------------------

    def ready_files(self) -> list[tuple[Path, Signature]]:
        """Files unchanged for settle_s and open for writing by nobody; symlinks are refused here."""
        now = time.monotonic()
        settled: list[tuple[Path, Signature, os.stat_result]] = []
        names = set()
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            name = entry.name
            if name.startswith(".") or not name.endswith(SUFFIXES):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                self.reject(path, "symlinks are refused; copy the file into pickup/ instead")
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            names.add(name)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            seen = self._seen.get(name)
            if seen is None or seen[0] != signature:
                self._seen[name] = (signature, now)
                continue
            if now - seen[1] >= self.settle_s:
                settled.append((path, signature, st))
        for name in set(self._seen) - names:
            del self._seen[name]
        if not settled:
            return []
        writing = open_for_writing()
        ready = []
        for path, signature, st in settled:
            if writing is not None and (st.st_dev, st.st_ino) in writing:
                self._seen[path.name] = (signature, now)  # a writer still holds it: settle again
                continue
            ready.append((path, signature))
        # Modules first: a definitions file dropped beside the module whose services it
        # names must find them deployed.
        return sorted(ready, key=lambda item: (item[0].suffix != ".py", item[0].name))

    # -- handling one file -------------------------------------------------------------

    def handle(self, path: Path, signature: Signature) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            logger.warning("pickup: %s cannot be opened (%s); trying again", path.name, exc)
            return
        with os.fdopen(fd, "rb") as file:
            data = file.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.reject(path, f"{path.name}: not UTF-8 text ({exc})")
            return
        result = self.deploy(path.name, text)
        if result.is_rejected:
            logger.error("pickup: %s rejected: %s; the previous version keeps serving",
                         path.name, result.problem)
            self.reject(path, str(result.problem))
            return
        if result.must_wait:  # the ODB unavailable: keep the file for as long as that lasts
            logger.warning("pickup: %s waits (%s); trying again on the next pass", path.name, result.problem)
            return
        if result.code != 0:  # the deploy process crashed or timed out
            if self._count_failure(path.name, signature) >= DEPLOY_TRIES:
                self.reject(path, f"{path.name}: its deploy failed {DEPLOY_TRIES} times: {result.problem}")
                return
            logger.warning("pickup: %s: its deploy failed (%s); trying again on the next pass",
                           path.name, result.problem)
            return
        self._failures.pop(path.name, None)
        for outcome in result.outcomes:
            logger.info("pickup: %s", outcome)
        self._seen.pop(path.name, None)
        try:
            st = path.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        if (st.st_ino, st.st_size, st.st_mtime_ns) != signature:
            logger.warning("pickup: %s changed while it was deployed; it is deployed again", path.name)
            return
        self._move(path, DEPLOYED)
        self._prune()

    def _count_failure(self, name: str, signature: Signature) -> int:
        """One more failed deploy of NAME as it is now (a changed file counts from zero)."""
        before, count = self._failures.get(name, (signature, 0))
        count = count + 1 if before == signature else 1
        self._failures[name] = (signature, count)
        return count

    def reject(self, path: Path, reason: str) -> None:
        """Move PATH to rejected/ with a .error file beside it; the operator's copy stays."""
        self._seen.pop(path.name, None)
        self._failures.pop(path.name, None)
        target = self._move(path, REJECTED)
        if target is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            with os.fdopen(os.open(target.with_name(target.name + ".error"), flags, 0o600), "w",
                           encoding="utf-8") as file:
                file.write(reason + "\n")
            logger.error("pickup: %s moved to %s: %s", path.name, target, reason)

    def _move(self, path: Path, where: str) -> Path | None:
        folder = self.directory / where
        folder.mkdir(exist_ok=True)
        target = folder / f"{_stamp()}-{path.name}"
        try:
            os.rename(path, target)  # a symlink moves as a link
        except FileNotFoundError:
            return None
        # It may hold secrets (a URL's password): its owner's only, whatever mode it came with.
        if not target.is_symlink():
            target.chmod(0o600)
        return target

    def _prune(self) -> None:
        folder = self.directory / DEPLOYED
        kept = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        for old in kept[: max(0, len(kept) - self.keep_deployed)]:
            old.unlink(missing_ok=True)

    def run_forever(self) -> None:
        logger.info("pickup: watching %s (settle %.1f s)", self.directory, self.settle_s)
        while not self._stopping.is_set():
            try:
                for path, signature in self.ready_files():
                    if self._stopping.is_set():
                        break
                    self.handle(path, signature)
            except Exception:  # the thread must outlive one bad pass: it is the server's only watcher
                logger.exception("pickup: a pass over %s failed; the watcher goes on", self.directory)
            self._stopping.wait(POLL_S)
        logger.info("pickup: stopped")
