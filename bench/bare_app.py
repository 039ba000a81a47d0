"""The baseline of `make bench`: a bare falcon app echoing JSON under esb's gunicorn settings.

It answers ``POST /demo/echo`` with the JSON body it was sent, the way idiomatic falcon
code does (``req.get_media()``, ``resp.media``), and runs under the same gunicorn
settings that ``esb/server/application.py`` gives an esb server: gevent workers, the
same worker count and ``worker_connections``, keepalive 5, no access log. Usage:

    python bench/bare_app.py --port 18000 [--workers 1] [--worker-connections 1000]

It runs in the foreground until SIGTERM or SIGINT, like any gunicorn master.
"""

from __future__ import annotations

import argparse
import sys

import falcon
from gunicorn.app.base import BaseApplication


class Echo:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = req.get_media(default_when_empty={})


def make_app() -> falcon.App:
    app = falcon.App()
    app.add_route("/demo/echo", Echo())
    return app


class BareApplication(BaseApplication):
    def __init__(self, settings: dict):
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings.items():
            self.cfg.set(key, value)

    def load(self) -> falcon.App:
        return make_app()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-connections", type=int, default=10000)  # esb's default
    parser.add_argument("--timeout", type=int, default=30)
    args = parser.parse_args(argv)
    # gunicorn parses sys.argv in places; keep it from seeing ours.
    sys.argv = [sys.argv[0]]
    BareApplication(
        {
            "bind": [f"{args.host}:{args.port}"],
            "workers": args.workers,
            "worker_class": "gevent",
            "worker_connections": args.worker_connections,
            "timeout": args.timeout,
            "keepalive": 5,
            "accesslog": None,
            "loglevel": "warning",
            "proc_name": "esb-bench-bare",
        }
    ).run()


if __name__ == "__main__":
    main()
