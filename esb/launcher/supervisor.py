"""`esb start`: the launcher that runs and supervises every process of one server.

It starts the embedded Redis (when configured), prepares the ODB, then runs the arbiter
and the scheduler as children and the pickup watcher as a thread of its own
(``esb.deploy.pickup``). It imports neither the web stack (falcon, gunicorn, gevent) nor
the scheduler's (APScheduler), nor the deploy stack (SQLAlchemy, redis-py): the ODB is
prepared, and picked-up files deployed, by short-lived ``esb.deploy.apply`` processes,
so the launcher stays a small process for the server's whole life
(``tests/unit/test_launcher_imports.py``). Signal handlers only record the
signal; the loop acts on it. A scheduler or embedded Redis that dies is
started again with backoff (``esb.launcher.children``: within a second the first time, at
the retry policy's ceiling once it keeps dying); the arbiter replaces its own workers, and
its own death stops the server with the reason. What the launcher knows of its children
goes to ``run/supervision.json``, which ``esb status`` reads.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

from esb.config import ServerConfig
from esb.deploy.apply import prepared_marker, run_apply
from esb.deploy.environment import record_server_environment
from esb.deploy.pickup import PickupWatcher, deploy_in_process
from esb.errors import EsbError
from esb.launcher.children import (
    CRASH_LOOP_EXITS,
    CRASH_LOOP_WINDOW_S,
    Child,
    embedded_redis,
    python_child,
    redis_answers_ping,
)
from esb.launcher.pidfiles import Recorded, check_launcher, write_children_file, write_pid_file
from esb.observe import metrics, supervision
from esb.observe.logs import file_handler
from esb.observe.retry import CHILD_RESTART, RetryPolicy

logger = logging.getLogger(__name__)

LOOP_S = 0.2
# A process just started, polled until it answers: the embedded Redis answers within
# about 20 ms, and every poll saved is start time saved.
STARTUP_POLL = RetryPolicy(interval_start_s=0.01, interval_step_s=0.01, interval_max_s=0.2)
# How often a stopping child is looked at.
STOP_POLL_S = 0.02
# An arbiter that dies this soon after starting has a problem a restart will not fix.
ARBITER_MIN_LIFE_S = 10.0
GUNICORN_HALT_CODES = {3: "a worker failed to boot", 4: "the application failed to load"}
ROLES = ("server", "scheduler", "pickup")


class StartError(EsbError):
    """The server could not be started; the message says why."""


def pid_file(config: ServerConfig) -> Path:
    return config.run_dir / "esb.pid"


def children_file(config: ServerConfig) -> Path:
    return config.run_dir / "children.json"


def running_launcher(config: ServerConfig) -> tuple[Recorded | None, list[str]]:
    """The launcher running in this directory, if it is still the process esb started;
    stale pid files are removed, one line each in the second item."""
    return check_launcher(pid_file(config), children_file(config))


class Launcher:
    def __init__(self, config: ServerConfig, roles: tuple[str, ...] = ROLES):
        self.config = config
        self.roles = roles
        self.children: list[Child] = []
        self.redis_child: Child | None = None
        self.pickup: PickupWatcher | None = None
        self._signals: list[int] = []
        self._exit_code = 0

    # -- signals: record only --------------------------------------------------------

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def install_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._record_signal)

    # -- start -----------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until told to stop, stop everything; the exit code."""
        config = self.config
        running, stale = running_launcher(config)
        for line in stale:
            logger.warning("%s", line)
        if running is not None:
            raise StartError(
                f"a server is already running in {config.directory} (pid {running.pid}); 'esb stop' it first"
            )
        for directory in (config.run_dir, config.log_dir, config.pickup_dir, config.config_dir):
            directory.mkdir(parents=True, exist_ok=True)
        write_pid_file(pid_file(config), os.getpid())
        # Deploys validate in the environment the workers will have: this one.
        record_server_environment(config.run_dir)
        self.install_signals()
        try:
            self.start_all()
            self.supervise()
        except StartError as exc:
            logger.critical("esb start failed: %s", exc)
            self._exit_code = 1
        finally:
            self.stop_all()
            pid_file(config).unlink(missing_ok=True)
            children_file(config).unlink(missing_ok=True)
            supervision.facts_path(config.run_dir).unlink(missing_ok=True)
        return self._exit_code

    def check_port(self) -> None:
        """Fail with a sentence now rather than let the arbiter retry and exit later."""
        host, port = self.config.main.host, self.config.main.port
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
        except OSError as exc:
            raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None

    def start_all(self) -> None:
        config = self.config
        if "server" in self.roles:
            self.check_port()
        if config.is_redis_embedded:
            self.redis_child = embedded_redis(config)
            config.embedded_redis_socket.unlink(missing_ok=True)
            self.redis_child.start()
            self._record_children()
            self.wait_for_redis()
        if "server" in self.roles:
            # The arbiter prepares the ODB itself before it forks (esb.server.application).
            metrics.empty_directory(config.run_dir)  # this start counts from zero
            prepared_marker(config.run_dir).unlink(missing_ok=True)
            self._start_child(python_child("server", "esb.server", config, is_essential=True))
            self.wait_for_prepared(self.children[-1])
        else:
            self.prepare_odb()
        if "scheduler" in self.roles and config.scheduler.enabled:
            self._start_child(python_child("scheduler", "esb.scheduler", config, own_log="scheduler.log"))
        if "pickup" in self.roles:
            self.start_pickup()

    def start_pickup(self) -> None:
        """The server's one pickup watcher, a thread here; it logs to server.log, beside
        the deploys workers apply."""
        config = self.config
        pickup_log = logging.getLogger("esb.deploy.pickup")
        pickup_log.addHandler(file_handler(config.log_dir / "server.log", as_json=config.logging.json))
        self.pickup = PickupWatcher(
            config.pickup_dir,
            deploy_in_process(config.directory),
            settle_s=config.pickup.settle_s,
            keep_deployed=config.pickup.keep_deployed,
        )
        self.pickup.start()

    def _start_child(self, child: Child) -> None:
        self.children.append(child)
        child.start()
        logger.info("started %s (pid %d)", child.name, child.pid)
        self._record_children()

    def wait_for_prepared(self, arbiter: Child, timeout_s: float = 120.0) -> None:
        """Until the arbiter has prepared the ODB: the scheduler reads it from its start.
        An arbiter that exits first could not; its output says why."""
        marker = prepared_marker(self.config.run_dir)
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while not marker.exists():
            if arbiter.poll() is not None:
                said = "\n".join(arbiter.output_tail(5)) or f"see {arbiter.log_file} and server.log"
                raise StartError(f"the server did not start: {said}")
            if time.monotonic() > deadline:
                raise StartError(
                    f"the arbiter did not prepare the ODB within {timeout_s:.0f} s; see server.log"
                )
            attempts += 1
            time.sleep(STARTUP_POLL.interval_s(attempts))

    def wait_for_redis(self, timeout_s: float = 15.0) -> None:
        """Until the embedded Redis answers PING on its socket (a raw RESP exchange: the
        launcher does not import redis-py for one command)."""
        path = str(self.config.embedded_redis_socket)
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while time.monotonic() < deadline:
            if self.redis_child and self.redis_child.poll() is not None:
                raise StartError(f"embedded Redis exited; see {self.redis_child.log_file}")
            if redis_answers_ping(path):
                return
            attempts += 1
            time.sleep(STARTUP_POLL.interval_s(attempts))
        raise StartError(f"embedded Redis did not answer within {timeout_s:.0f} s")

    def prepare_odb(self) -> None:
        """Create the ODB schema and deploy config/*.toml, so workers find them there; in
        an ``esb.deploy.apply`` process (why: that module's docstring)."""
        result = run_apply(self.config.directory, ["--config"])
        for outcome in result.outcomes:
            logger.info("config: %s", outcome)
        if result.is_rejected:
            raise StartError(f"invalid object definitions: {result.problem}")
        if result.code != 0:
            raise StartError(str(result.problem))

    # -- supervise -------------------------------------------------------------------

    def supervise(self) -> None:
        while True:
            if self._signals:
                signum = self._signals.pop(0)
                logger.info("received %s; stopping", signal.Signals(signum).name)
                return
            now = time.monotonic()
            for child in self._supervised():
                if child.next_start is not None:  # died; waiting to start it again
                    if child.is_due(now):
                        self._restart(child)
                    continue
                code = child.poll()
                if code is None:
                    if child.settled(now):
                        logger.info("%s (pid %d) has run steadily for %.0f s: no longer reported",
                                    child.name, child.pid, CRASH_LOOP_WINDOW_S)
                        self._record_children()
                    continue
                if child.is_essential:
                    self._handle_essential_exit(child, code)
                    return
                self._handle_exit(child, code, now)
            time.sleep(LOOP_S)

    def _handle_exit(self, child: Child, code: int, now: float) -> None:
        """Log the death and when the child starts again; the first time it is found
        crash-looping, log its last lines of output too."""
        lived_s = now - child.started_at
        was_looping = child.crash_looping
        delay_s = child.exited(code, now)
        if child.crash_looping and not was_looping:
            output = "\n".join(f"    {line}" for line in child.last_output) or "    (nothing)"
            logger.error(
                "%s (pid %d) keeps dying: %d exits within %.0f s, the last one %s after %.1f s; "
                "starting it again every %.0f s until a run lasts %.0f s. Its last output:\n%s",
                child.name,
                child.pid,
                CRASH_LOOP_EXITS,
                CRASH_LOOP_WINDOW_S,
                child.last_exit,
                lived_s,
                delay_s,
                CRASH_LOOP_WINDOW_S,
                output,
            )
        else:
            logger.error(
                "%s (pid %d) died: %s after %.1f s; starting it again in %.1f s",
                child.name,
                child.pid,
                child.last_exit,
                lived_s,
                delay_s,
            )
        self._record_children()

    def _restart(self, child: Child) -> None:
        try:
            child.start()
        except OSError as exc:  # its program is gone, say: a later attempt may find it back
            child.next_start = time.monotonic() + child.policy.interval_max_s
            logger.error("%s could not be started (%s); trying again in %.0f s",
                         child.name, exc, child.policy.interval_max_s)
            return
        child.restarts += 1
        self._record_children()
        logger.info("restarted %s (pid %d)", child.name, child.pid)

    def _supervised(self) -> list[Child]:
        return ([self.redis_child] if self.redis_child else []) + self.children

    def _handle_essential_exit(self, child: Child, code: int) -> None:
        reason = GUNICORN_HALT_CODES.get(code)
        lived_s = time.monotonic() - child.started_at
        if reason is None and lived_s < ARBITER_MIN_LIFE_S:
            reason = f"it exited with {code} after {lived_s:.1f} s (port in use? see server.log)"
        logger.critical(
            "the arbiter (pid %d) stopped: %s; stopping the server", child.pid, reason or f"exit code {code}"
        )
        self._exit_code = 1

    def _record_children(self) -> None:
        """The pids for `esb stop`; the facts for `esb status`."""
        write_children_file(
            children_file(self.config),
            {child.name: Recorded(child.pid, child.start_time) for child in self._supervised() if child.pid},
        )
        supervision.write_facts(
            self.config.run_dir,
            {
                "launcher_pid": os.getpid(),
                "crash_exits": CRASH_LOOP_EXITS,
                "crash_window_s": CRASH_LOOP_WINDOW_S,
                "restart_ceiling_s": CHILD_RESTART.interval_max_s,
                "children": [child.facts() for child in self._supervised()],
            },
        )

    # -- stop ------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Stop in reverse order of need: the pickup watcher, the scheduler and the arbiter
        (graceful) at once, then Redis, which the others use until they are gone.

        The scheduler and the arbiter do not wait for each other: a firing the scheduler
        put on the stream stays there for the next start, and stopping them one after the
        other only added the scheduler's stop to every `esb stop`."""
        if self.pickup is not None:
            self.pickup.stop(timeout_s=0)  # asks; joined below
        grace_s = self.config.main.graceful_timeout_s + 5
        self._stop_group(self.children, {"server": grace_s}, default_timeout_s=10)
        if self.redis_child:
            self._stop_group([self.redis_child], {}, default_timeout_s=10)
        if self.pickup is not None:
            self.pickup.stop()
        logger.info("all processes of %s stopped", socket.gethostname())

    def _stop_group(
        self, children: list[Child], timeouts_s: dict[str, float], *, default_timeout_s: float
    ) -> None:
        """SIGTERM to each of CHILDREN, then wait for each up to its timeout (by name)."""
        for child in children:
            child.signal(signal.SIGTERM)
        started = time.monotonic()
        for child in children:
            timeout_s = timeouts_s.get(child.name, default_timeout_s)
            deadline = started + timeout_s
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(STOP_POLL_S)
            if child.poll() is None:
                logger.warning(
                    "%s (pid %d) ignored SIGTERM for %.0f s; killing it", child.name, child.pid, timeout_s
                )
                child.signal(signal.SIGKILL)
                child.proc.wait()
