"""The arbiter: gunicorn's master driven through its application API, gevent workers."""

from __future__ import annotations

import gc
import logging
import os
import sys

import redis
from gunicorn.app.base import BaseApplication

from esb.bus import Keys, make_redis
from esb.config import ServerConfig, load_server_config
from esb.deploy.apply import prepare_odb, prepared_marker
from esb.errors import ConfigError, DeployError, EsbError
from esb.observe import metrics, setup_logging
from esb.server import hooks
from esb.server.arbiter import EsbArbiter

logger = logging.getLogger(__name__)

# The arbiter's exit code when the ODB cannot be prepared (the reason is on its stderr).
CANNOT_PREPARE = 2


class EsbApplication(BaseApplication):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.keys = Keys(config.main.cluster)
        self.runtime = None
        self._arbiter_redis: redis.Redis | None = None
        super().__init__()

    def load_config(self) -> None:
        c = self.config
        settings = {
            "bind": [f"{c.main.host}:{c.main.port}"],
            "workers": c.main.workers,
            # gunicorn's gevent worker, answering its parser's refusals in esb's JSON.
            "worker_class": "esb.server.gevent_worker.EsbGeventWorker",
            "worker_connections": c.main.worker_connections,
            "timeout": c.main.timeout_s,
            "graceful_timeout": c.main.graceful_timeout_s,
            "keepalive": 5,
            "pidfile": str(c.run_dir / "arbiter.pid"),
            "errorlog": str(c.log_dir / "server.log"),
            "loglevel": c.logging.level.lower(),
            "proc_name": f"esb-server:{c.main.cluster}",
            # PERF(esb): no access log by default; one line per request costs a quarter of
            # the throughput on a 2-core machine.
            "accesslog": None,
            # gunicorn's control socket is one path per user ($HOME/.gunicorn/gunicorn.ctl):
            # every server of the host would take it from the one before. esb's own CLI and
            # status do its work, so no arbiter opens it (nor runs its thread).
            "control_socket_disable": True,
            "post_worker_init": hooks.post_worker_init,
            "worker_abort": hooks.worker_abort,
            "worker_exit": hooks.worker_exit,
            "child_exit": hooks.child_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        """Runs in each worker after fork: build its runtime and hand gunicorn the app."""
        from esb.server.worker import WorkerRuntime  # imports gevent-aware code post-patch

        setup_logging(
            self.config.log_dir / "server.log",
            level=self.config.logging.level,
            as_json=self.config.logging.json,
        )
        self.runtime = WorkerRuntime(self.config)
        return self.runtime.app

    def run(self) -> None:
        """gunicorn's run with esb's arbiter: a booted worker's exit code cannot halt it."""
        try:
            EsbArbiter(self).run()
        except RuntimeError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            raise SystemExit(1) from None

    def arbiter_redis(self) -> redis.Redis:
        """The arbiter's own client, made on first use (never before a fork)."""
        if self._arbiter_redis is None:
            self._arbiter_redis = make_redis(self.config.redis_url, socket_timeout_s=2.0, retries=1)
        return self._arbiter_redis


def preload_worker_modules() -> None:
    """Import, in the arbiter before it forks, the modules every worker imports in load().

    The workers then share those pages copy-on-write instead of each holding its own copy
    (falcon, SQLAlchemy Core, redis-py, gevent, esb's runtime: about 25 MB of a worker's
    58), and do not each spend the import time at boot. Imports only: nothing in them opens a
    socket, starts a thread or greenlet, or gets a gevent hub at import;
    gunicorn's gevent worker patches the standard library after the fork as before, and
    those modules look socket, threading and time up when called. This is not gunicorn's
    ``preload_app``: the app and its runtime are still built in each worker, after fork.
    """
    import esb.server.worker  # noqa: F401


def prepare(config: ServerConfig) -> None:
    """Prepare the ODB (schema, config/*.toml) before any worker exists, then leave the
    marker the launcher waits for; exit 2 with the reason on stderr when it cannot.

    Here rather than in a process of its own: this process has just imported everything
    it takes, for its workers, and a Python process less is about 0.5 s less of `esb
    start`. The engine and the Redis client are closed before the fork.
    """
    try:
        for outcome in prepare_odb(config):
            logger.info("config: %s", outcome)
    except (ConfigError, DeployError) as exc:
        logger.critical("invalid object definitions: %s", exc)
        print(f"invalid object definitions: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(CANNOT_PREPARE) from None
    except EsbError as exc:
        logger.critical("the ODB could not be prepared: %s", exc)
        print(f"the ODB could not be prepared: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(CANNOT_PREPARE) from None
    prepared_marker(config.run_dir).write_text(str(os.getpid()))


def main(argv: list[str] | None = None) -> None:
    """``python -m esb.server DIR``: run the arbiter in the foreground (the launcher does)."""
    argv = sys.argv[1:] if argv is None else argv
    config = load_server_config(argv[0])
    setup_logging(config.log_dir / "server.log", level=config.logging.level, as_json=config.logging.json)
    metrics.use_directory(config.run_dir)  # before anything imports prometheus_client
    preload_worker_modules()
    prepare(config)
    # The pre-fork objects are never collected: kept out of every collection, the pages
    # that hold them stay shared with the workers (a collection writes to each object).
    gc.freeze()
    # gunicorn parses sys.argv in places; keep it from seeing ours.
    sys.argv = [sys.argv[0]]
    EsbApplication(config).run()
