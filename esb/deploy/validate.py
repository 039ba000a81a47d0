"""Import service modules in a short-lived process started like a worker, and read its verdict.

A module runs code when imported; running it here first means one that fails to compile,
to import, that hangs, or that ends its process never reaches a worker. The process gets
the server's environment, no current directory on ``sys.path`` (``-P``), and imports
every module of the set the workers will load, in their order.

The verdict comes back on a pipe of its own, not on stdout: the child learns the pipe's
descriptor and a nonce from its stdin (then closed), moves the descriptor out of the way
and signs every line with the nonce, so a module that prints a verdict of its own, or
calls ``os._exit(0)``, is rejected. This guards against accidents and naive tricks; a
deployed module runs with the server's rights anyway, so it is not a sandbox.

The parent measures the imports against a limit below ``[main] timeout_s`` (a worker
whose loop is held that long is killed by the arbiter) and kills the child past it.
The child runs in a process group of its own, and once it has answered (or timed out)
the whole group is killed: a process a module started at import (from a thread, by
multiprocessing) must not outlive the verdict, one more per later deploy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from esb.errors import DeployError

# Time allowed for the interpreter and esb to start before the imports are timed.
STARTUP_S = 60.0


def sql_driver_problem(url: str) -> str | None:
    """Why URL's SQLAlchemy dialect or its driver package cannot be loaded in this
    interpreter, or None. A worker makes an outconn's engine on first use: without this
    check a missing driver would first show as every run of a notification failing."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # the URL itself is not shown: it may hold a password
        return "is not an SQLAlchemy URL such as postgresql+psycopg://user@host/db"
    try:
        parsed.get_dialect().import_dbapi()
    except Exception as exc:
        return (f"dialect and driver {parsed.drivername!r} cannot be loaded in the server's environment "
                f"({type(exc).__name__}: {exc}); install the driver's package or name one that is installed")
    return None


@dataclass(frozen=True)
class ModuleVerdict:
    """How one module imported: its service names, or the reason (and line) it failed."""

    name: str
    services: tuple[str, ...] = ()
    error: str | None = None
    line: int | None = None


def validate_modules(
    modules: list[tuple[str, str]],
    *,
    environ: Mapping[str, str],
    limit_s: float,
    cwd: Path | None = None,
) -> dict[str, ModuleVerdict]:
    """Import every (name, source) in one child process; a verdict per module.

    Raises DeployError naming the module when the child dies, exits or runs past
    LIMIT_S while importing it, since a worker would do the same.
    """
    nonce = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "esb.deploy.validate"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=(write_fd,),
                env=dict(environ),
                cwd=str(cwd) if cwd else None,
                close_fds=True,
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        try:
            request = {"nonce": nonce, "fd": write_fd, "modules": modules}
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(json.dumps(request).encode())
                proc.stdin.close()
            events = _read_events(proc, read_fd, nonce, limit_s)
        finally:
            os.close(read_fd)
            _kill_group(proc)
            proc.wait()
        stderr.seek(0)
        tail = stderr.read().decode("utf-8", "replace").strip().splitlines()
    return _verdicts(events, proc.returncode, tail, limit_s)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the child and everything in its process group. Before it is reaped, the
    child's pid (the group's id) cannot go to another process."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _read_events(proc: subprocess.Popen, fd: int, nonce: str, limit_s: float) -> list[dict]:
    events: list[dict] = []
    buffer = b""
    deadline = time.monotonic() + STARTUP_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            proc.kill()
            events.append({"event": "timeout"})
            return events
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return events  # the child closed its end: it finished or it died
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict) or event.pop("nonce", None) != nonce:
                continue  # not written by the validator itself
            events.append(event)
            if event["event"] == "start":
                deadline = time.monotonic() + limit_s
            if event["event"] == "done":
                return events


def _verdicts(
    events: list[dict], returncode: int, tail: list[str], limit_s: float
) -> dict[str, ModuleVerdict]:
    verdicts: dict[str, ModuleVerdict] = {}
    importing: str | None = None
    for event in events:
        kind = event["event"]
        if kind == "importing":
            importing = event["module"]
        elif kind == "module":
            importing = None
            name = event["module"]
            verdicts[name] = ModuleVerdict(
                name, tuple(event.get("services") or ()), event.get("error"), event.get("line")
            )
        elif kind == "done":
            return verdicts
        elif kind == "timeout":
            where = f"{importing}.py" if importing else "validation"
            raise DeployError(
                where,
                f"importing it took over {limit_s:g} s, the limit (half of [main] timeout_s) under "
                "which a worker importing it is not killed; move slow work out of import time",
            )
    if importing is not None:
        how = f"exit code {returncode}" if returncode >= 0 else f"signal {-returncode}"
        raise DeployError(
            f"{importing}.py",
            f"the process importing it ended ({how}) before the import finished; "
            "a worker importing it would end the same way",
        )
    reason = tail[-1] if tail else f"the validator ended with {returncode}"
    raise DeployError("validation", f"the validating process failed: {reason}")


# -- the child ---------------------------------------------------------------------------


def _child() -> None:
    request = json.loads(sys.stdin.buffer.read())
    # Nothing the modules do reaches our stdin; the verdict pipe moves to an unguessable
    # descriptor that no process they start inherits.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    given = int(request["fd"])
    verdict_fd = fcntl.fcntl(given, fcntl.F_DUPFD_CLOEXEC, 300 + secrets.randbelow(700))
    os.close(given)
    nonce = request["nonce"]
    modules = request["modules"]
    del request

    def emit(**event: object) -> None:
        os.write(verdict_fd, (json.dumps({**event, "nonce": nonce}) + "\n").encode())

    from esb.service.loader import check_module_name, load_module, services_in

    emit(event="start")
    for name, source in modules:
        emit(event="importing", module=name)
        try:
            check_module_name(name)
            module = load_module(name, source, f"{name}.py")
            services = sorted(services_in(module))
        except DeployError as exc:
            emit(event="module", module=name, error=exc.reason, line=exc.line)
            continue
        except BaseException as exc:  # SystemExit and the like would end a worker
            emit(
                event="module",
                module=name,
                error=f"{type(exc).__name__} at import would stop the worker: {exc}",
                line=None,
            )
            continue
        emit(event="module", module=name, services=services)
    emit(event="done")
    os.close(verdict_fd)
    # Leave at once: atexit handlers and threads a module started are not ours to wait for.
    os._exit(0)


if __name__ == "__main__":
    _child()
