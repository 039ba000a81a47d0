"""Helpers for the scheduler's integration tests: a server directory with an SQLite ODB,
scheduler subprocesses, and a stand-in worker that consumes the real dispatch stream the
way esb workers do (consumer group, run records, de-duplication marker, ack and delete).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from esb.bus import DispatchMessage, Keys, ensure_group
from esb.bus.dispatch import finish, is_done
from esb.odb import UNIT, OdbStore
from esb.scheduler import records
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


@dataclass
class FakeWorker:
    """Consumes the dispatch stream in a thread and records every run, like esb workers."""

    server: ServerDir
    run_s: float = 0.0
    runs: list[Run] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> FakeWorker:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        client = redis.Redis.from_url(self.server.redis_url, decode_responses=True,
                                      socket_timeout=2)
        keys = self.server.keys
        name = f"fake-{uuid.uuid4().hex[:6]}"
        while not self._stop.is_set():
            try:
                ensure_group(client, keys)
                batch = client.xreadgroup(keys.dispatch_group, name, {keys.dispatch: ">"},
                                          count=10, block=200)
                for _stream, entries in batch or []:
                    for entry_id, fields in entries:
                        self._run(client, keys, entry_id, DispatchMessage.from_fields(fields))
            except redis.RedisError:
                time.sleep(0.2)  # Redis restarting: what was not acknowledged is read again

    def _run(self, client: redis.Redis, keys: Keys, entry_id: str, msg: DispatchMessage) -> None:
        if not is_done(client, keys, msg.msg_id):
            job = msg.job or {}
            self.runs.append(Run(job["name"], job["firing_id"], job["scheduled_at"], msg.payload,
                                 time.time(), msg.msg_id))
            if self.run_s:
                time.sleep(self.run_s)
            records.job_finished(client, keys, job["name"], job["firing_id"], self.run_s, None)
        finish(client, keys, entry_id, msg.msg_id, 3600)

    def firing_ids(self, job: str | None = None) -> list[str]:
        return [r.firing_id for r in self.runs if job is None or r.job == job]
