"""Helpers for the scheduler's integration tests: a server directory with an SQLite ODB,
scheduler subprocesses, and a stand-in worker that runs esb's own dispatch consumer, so
that what the scheduler puts on the stream runs as it would in a server: a firing on the
stream twice runs twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from esb.bus import Keys
from esb.odb import UNIT, OdbStore
from tests.conftest import REDIS_URL


def unique_cluster(prefix: str = "sched") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def job_toml(name: str, service: str = "test.tick", **fields) -> str:
    lines = ["[[scheduler.job]]", f'name = "{name}"', f'service = "{service}"']
    for key, value in fields.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@dataclass
class ServerDir:
    path: Path
    cluster: str
    keys: Keys
    odb: OdbStore
    client: redis.Redis
    redis_url: str = REDIS_URL

    def deploy(self, unit: str, text: str, *, announce: bool = True) -> None:
        self.odb.put(UNIT, unit, text)
        if announce:
            self.client.publish(self.keys.deploy_channel, str(self.odb.generation()))

    def state(self, job: str) -> dict[str, str]:
        return self.client.hgetall(self.keys.job_state(job))

    def close(self) -> None:
        self.odb.dispose()
        self.client.close()


def make_server_dir(tmp_path: Path, cluster: str, *, scheduler: dict | None = None,
                    units: dict[str, str] | None = None, redis_url: str = REDIS_URL) -> ServerDir:
    """A server directory holding server.conf and an SQLite ODB with UNITS deployed."""
    conf = {
        "main": {"cluster": cluster},
        "redis": {"url": redis_url, "socket_timeout_s": 1.0},
        "odb": {"url": "sqlite:///odb.sqlite"},
        "admin": {"password": "test"},
        "observe": {"heartbeat_interval_s": 0.5, "stale_after_s": 3},
        "scheduler": scheduler or {},
    }
    text = ""
    for section, values in conf.items():
        text += f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
    (tmp_path / "server.conf").write_text(text)
    odb = OdbStore(f"sqlite:///{tmp_path / 'odb.sqlite'}")
    odb.create_schema()
    for name, body in (units or {}).items():
        odb.put(UNIT, name, body)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return ServerDir(tmp_path, cluster, Keys(cluster), odb, client, redis_url)


class SchedulerProc:
    """``python -m esb.scheduler DIR`` in its own process group."""

    def __init__(self, server: ServerDir):
        self.server = server
        self.proc: subprocess.Popen | None = None

    def start(self) -> SchedulerProc:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(self.server.path / "scheduler.stdout.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "esb.scheduler", str(self.server.path)],
            stdout=log, stderr=log, env=env, start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def instance(self) -> str | None:
        """The instance id this process announces in its heartbeat."""
        keys = self.server.keys
        for key in self.server.client.scan_iter(match=keys.scheduler_heartbeat_pattern):
            fields = self.server.client.hgetall(key)
            if fields.get("pid") == str(self.pid):
                return fields.get("instance")
        return None

    def is_active(self) -> bool:
        instance = self.instance()
        return instance is not None and self.server.client.get(
            self.server.keys.scheduler_lease) == instance

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def log(self) -> str:
        path = self.server.path / "logs" / "scheduler.log"
        return path.read_text() if path.exists() else ""


@dataclass
class Run:
    job: str
    firing_id: str
    scheduled_at: str
    payload: object
    started: float  # time.time()
    msg_id: str


class StandInWorker:
    """esb's real dispatch consumer in a process of its own (``stand_in_worker.py``); each
    message it runs is one ``Run``, in the order they started."""

    def __init__(self, server: ServerDir, run_s: float = 0.0):
        self.server = server
        self.run_s = run_s
        self.runs_path = server.path / f"runs-{uuid.uuid4().hex[:6]}.jsonl"
        self.proc: subprocess.Popen | None = None

    def start(self) -> StandInWorker:
        log = open(self.server.path / "stand-in-worker.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.stand_in_worker", self.server.redis_url,
             self.server.cluster, str(self.runs_path), str(self.run_s)],
            stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        ready = Path(f"{self.runs_path}.ready")
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the stand-in worker did not start (exit {self.proc.poll()})")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def runs(self) -> list[Run]:
        if not self.runs_path.exists():
            return []
        text = self.runs_path.read_text(encoding="utf-8")
        return [Run(**json.loads(line)) for line in text.splitlines(keepends=True)
                if line.endswith("\n")]

    def firing_ids(self, job: str | None = None) -> list[str]:
        return [r.firing_id for r in self.runs if job is None or r.job == job]
