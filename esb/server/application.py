"""The arbiter: gunicorn's master driven through its application API, gevent workers."""

from __future__ import annotations

import sys

import redis
from gunicorn.app.base import BaseApplication

from esb.bus import Keys, make_redis
from esb.config import ServerConfig, load_server_config
from esb.observe import metrics, setup_logging
from esb.server import hooks
from esb.server.arbiter import EsbArbiter


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


def main(argv: list[str] | None = None) -> None:
    """``python -m esb.server DIR``: run the arbiter in the foreground (the launcher does)."""
    argv = sys.argv[1:] if argv is None else argv
    config = load_server_config(argv[0])
    setup_logging(config.log_dir / "server.log", level=config.logging.level, as_json=config.logging.json)
    metrics.use_directory(config.run_dir)  # before anything imports prometheus_client
    # gunicorn parses sys.argv in places; keep it from seeing ours.
    sys.argv = [sys.argv[0]]
    EsbApplication(config).run()
