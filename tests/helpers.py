"""Test helpers: deadlines instead of sleeps, and a running esb server under test."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

from esb.server.arbiter import booted_marker

ESB = [sys.executable, "-m", "esb.cli"]


def wait_until(predicate: Callable[[], Any], timeout_s: float = 15.0, interval_s: float = 0.1,
               message: str = "condition") -> Any:
    """Poll PREDICATE until it returns something truthy; fail the test after TIMEOUT_S."""
    deadline = time.monotonic() + timeout_s
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval_s)
    raise AssertionError(f"{message} not met within {timeout_s} s (last error: {last_exc})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def esb(*args: str, timeout_s: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run([*ESB, *args], capture_output=True, text=True, timeout=timeout_s)
    if check and done.returncode != 0:
        raise AssertionError(f"esb {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def modules_loaded_by(probe: str) -> set[str]:
    """Every module in sys.modules after PROBE ran in a fresh interpreter: what a process
    of that role holds (this one may have loaded anything for other tests)."""
    code = probe + "\nimport json as _json, sys as _sys\nprint(_json.dumps(sorted(_sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def loaded_packages(modules: set[str], packages: set[str]) -> set[str]:
    """The MODULES that are one of PACKAGES (dotted names allowed) or inside one."""
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Server:
    """A server directory made by quickstart and run by `esb start --fg` in its own group."""

    directory: Path
    port: int
    cluster: str
    workers: int = 2
    proc: subprocess.Popen | None = None
    admin: tuple[str, str] = ("admin", "")
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        data = body if isinstance(body, bytes | str) or body is None else json.dumps(body)
        return self.session.post(self.url(path), data=data, timeout=30, **kwargs)

    def admin_headers(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.admin[0]}:{self.admin[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def invoke(self, service: str, payload: Any = None) -> requests.Response:
        return self.post(f"/esb/invoke/{service}", payload or {}, headers=self.admin_headers())

    def status(self) -> dict:
        done = esb("status", str(self.directory), "--json")
        return json.loads(done.stdout)

    def deploy(self, *files: Path | str) -> subprocess.CompletedProcess:
        return esb("deploy", str(self.directory), *map(str, files))

    def start(self, timeout_s: float = 60) -> None:
        log = open(self.directory / "logs" / "fg.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen([*ESB, "start", str(self.directory), "--fg"], stdout=log,
                                     stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.answers, timeout_s, message=f"server {self.directory} answering /esb/ping")
        # /esb/ping answers once one worker does; a test that kills or counts workers must
        # not find the others still starting.
        wait_until(lambda: len(self.booted_workers()) == self.workers, timeout_s,
                   message=f"{self.workers} workers of {self.directory} booted")

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"esb start exited {self.proc.returncode}:\n{self.log_tail('fg.log')}")
        try:
            return requests.get(self.url("/esb/ping"), timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def arbiter_pid(self) -> int:
        return int((self.directory / "run" / "arbiter.pid").read_text())

    def worker_pids(self) -> list[int]:
        return [p for p in children_of(self.arbiter_pid()) if pid_alive(p)]

    def has_booted(self, pid: int) -> bool:
        """PID is past post_worker_init: it left its booted marker."""
        return booted_marker(self.directory / "run", pid).exists()

    def booted_workers(self) -> set[int]:
        return {p for p in self.worker_pids() if self.has_booted(p)}

    def replacement_of(self, victim: int, before: Iterable[int], timeout_s: float = 15.0) -> int:
        """The worker the arbiter started for VICTIM, killed when the workers were BEFORE:
        once there are as many again, VICTIM not among them, and the new one has booted. One
        look at the worker list per poll: two could straddle the reaping."""
        known = set(before)

        def replaced() -> set[int]:
            pids = set(self.worker_pids())
            new = pids - known
            if len(pids) != len(known) or victim in pids or not all(map(self.has_booted, new)):
                return set()
            return new

        return wait_until(replaced, timeout_s, message=f"the arbiter replaced worker {victim}").pop()

    def all_pids(self) -> list[int]:
        """The launcher and every process below it."""
        if self.proc is None:
            return []
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            if pid_alive(pid):
                found.append(pid)
                todo.extend(children_of(pid))
        return found

    def log_tail(self, name: str = "server.log", lines: int = 60) -> str:
        path = self.directory / "logs" / name
        if not path.exists():
            return f"(no {name})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def log(self, name: str = "server.log") -> str:
        path = self.directory / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            esb("stop", str(self.directory), timeout_s=90)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None


class PrivateRedis:
    """A redis-server of one test's own, so the test may kill it without disturbing others.

    ``persistent`` keeps an append-only file across restarts; without it a restart loses
    everything, as a cache-only Redis would.
    """

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not installed; the fault tests need it")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.directory), "--appendonly", "yes" if persistent else "no",
             "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port)
        wait_until(probe.ping, message="private Redis answering")
        probe.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
