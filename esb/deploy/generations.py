"""Generations as workers live them: what each applied, the last good one, and rollback.

- A worker writes a loading marker (``run/loading/<pid>.json``) just before it imports a
  module version and removes it once the import returned. A marker whose process is gone
  means that process died importing it; the next worker to start records the crash in the
  ODB, and once ``CRASHES_TO_REJECT`` workers died on the same version the server rolls
  back by itself to the last good generation (``OdbStore.roll_back``), recording why.
- Any worker, on its ODB poll, raises the last good generation to the one every live
  worker of the cluster applied without an error (their heartbeats say which).
- ``read_deploy_facts`` is the typed reader status uses for all of this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import redis

from esb.bus import Keys, parse_iso
from esb.observe.supervision import pid_is_running
from esb.odb import OdbStore, RejectedDeployment

logger = logging.getLogger(__name__)

# Two deaths on one version: one could be a coincidence (an OOM kill, a kill -9 by hand).
CRASHES_TO_REJECT = 2


class LoadingMarker:
    """This process's marker: which deployment it is importing right now, if any."""

    def __init__(self, run_dir: Path, pid: int | None = None):
        self.directory = run_dir / "loading"
        self.pid = os.getpid() if pid is None else pid
        self.path = self.directory / f"{self.pid}.json"

    def loading(self, generation: int, deployment_id: int, name: str, version: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"generation": generation, "deployment_id": deployment_id}
        self.path.write_text(json.dumps(record | {"module": name, "version": version}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def claim_crashes(run_dir: Path, odb: OdbStore, *, host: str | None = None) -> list[str]:
    """Turn markers left by dead workers into crash records; roll back a version that
    killed CRASHES_TO_REJECT workers. Returns one sentence per rollback.

    Raises OdbUnavailable; the markers are then left for the next worker to claim.
    """
    host = host or socket.gethostname()
    directory = run_dir / "loading"
    rollbacks: list[str] = []
    if not directory.is_dir():
        return rollbacks
    for marker in sorted(directory.glob("*.json")):
        try:
            pid = int(marker.stem)
        except ValueError:
            continue
        if pid == os.getpid() or pid_is_running(pid):
            continue
        claimed = marker.with_suffix(f".claimed-{os.getpid()}")
        try:
            marker.rename(claimed)  # atomic: one worker claims each marker
            record = json.loads(claimed.read_text())
        except (OSError, ValueError):
            continue
        deployment_id = int(record["deployment_id"])
        what = f"module {record['module']} version {record['version']}"
        crashes = odb.record_crash(deployment_id, host, pid)
        logger.error("worker %s:%d died while importing %s (%d such deaths)", host, pid, what, crashes)
        if crashes >= CRASHES_TO_REJECT:
            reason = f"{crashes} workers died while importing it ({record['module']}.py)"
            generation = odb.roll_back(deployment_id, reason)
            if generation is not None:
                sentence = f"{what} rejected: {reason}; back to the last good generation as {generation}"
                logger.error("%s", sentence)
                rollbacks.append(sentence)
        with contextlib.suppress(OSError):
            claimed.unlink()
    return rollbacks


@dataclass(frozen=True)
class WorkerGeneration:
    """What one live worker applied, and why it did not apply a newer one (if so)."""

    host: str
    pid: int
    generation: int
    error: str | None


@dataclass(frozen=True)
class DeployFacts:
    """The ODB's generation, the last good one, what was rolled back, and each worker's."""

    generation: int
    last_good: int
    rejected: list[RejectedDeployment]
    workers: list[WorkerGeneration]


def live_workers(client: redis.Redis, keys: Keys, stale_after_s: float) -> list[WorkerGeneration]:
    """Workers whose heartbeat is fresh, with the generation each applied."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    found = []
    for key in sorted(client.scan_iter(match=keys.worker_heartbeat_pattern, count=500)):
        fields = client.hgetall(key)
        moment = parse_iso(fields.get("last_heartbeat"))
        if moment is None or (now - moment).total_seconds() >= stale_after_s:
            continue
        found.append(
            WorkerGeneration(
                host=fields.get("host", ""),
                pid=int(fields.get("pid", 0)),
                generation=int(fields.get("generation", -1)),
                error=fields.get("generation_error") or None,
            )
        )
    return found


def advance_last_good(odb: OdbStore, client: redis.Redis, keys: Keys, stale_after_s: float) -> int | None:
    """Raise the last good generation when every live worker applied the same one cleanly.

    Returns the new last good generation, or None when it did not move. Raises
    OdbUnavailable or RedisError; the caller tries again on its next poll.
    """
    workers = live_workers(client, keys, stale_after_s)
    generations = {w.generation for w in workers}
    if not workers or len(generations) != 1 or any(w.error for w in workers):
        return None
    generation = generations.pop()
    if generation <= 0:
        return None
    if odb.set_last_good(generation):
        logger.info("generation %d is the last good one: every live worker applied it", generation)
        return generation
    return None


def read_deploy_facts(odb: OdbStore, client: redis.Redis, keys: Keys, stale_after_s: float) -> DeployFacts:
    """Everything status needs about deploys. Raises OdbUnavailable or RedisError."""
    return DeployFacts(
        generation=odb.generation(),
        last_good=odb.last_good(),
        rejected=odb.rejections(),
        workers=live_workers(client, keys, stale_after_s),
    )
