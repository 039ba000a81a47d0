"""The app layer alone: microseconds per POST /demo/echo through esb's falcon app and a bare one.

No network, no gunicorn, no Redis: both WSGI apps are called in-process with the same
prepared environ, so the difference is exactly what esb's channel path adds (cid,
channel lookup, body limit, Service object, response header). A profiling aid beside
`make bench`, whose end-to-end ratio also counts gunicorn's and gevent's fixed cost.
It also measures what the metrics add to a request: esb's app with and without the
counting wrapper a worker puts around it, and the recording alone (the wrapper, the
sink's channel mark and ServiceRuntime.invoke's timing, around an app that does nothing
else), whose budget is 1 us; and what the fair worker's turn through the gevent hub
between two requests of a connection costs (``take_turn``), beside ``gevent.sleep(0)``.
Usage:

    python bench/app_cost.py [--requests 50000]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bare_app  # noqa: E402

from esb.bus import Keys  # noqa: E402
from esb.config import load_server_config, merge_units  # noqa: E402
from esb.config.server_conf import SERVER_CONF, write_server_conf  # noqa: E402
from esb.observe import metrics  # noqa: E402
from esb.server.http import compile_channels, make_app  # noqa: E402
from esb.service import ServiceRuntime, ServiceStore  # noqa: E402

SERVICES = Path(__file__).resolve().parent.parent / "services"
BODY = b'{"name": "esb", "items": [1, 2, 3], "ok": true}'


def esb_app(directory: Path):
    """esb's worker app with the demo module and channels, as a worker builds it."""
    write_server_conf(
        directory / SERVER_CONF,
        {"main": {"cluster": "appcost"}, "admin": {"username": "admin", "password": "x"}},
    )
    config = load_server_config(directory)
    store = ServiceStore()
    store.rebuild([("demo", 1, (SERVICES / "demo.py").read_text())])
    runtime = ServiceRuntime(store, None, Keys("appcost"))
    app, sink = make_app(config, runtime, collect_status=dict, render_metrics=bytes)
    sink.table = compile_channels(merge_units([("demo", (SERVICES / "demo.toml").read_text())]))
    return app


def environ() -> dict:
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/demo/echo",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def recording_us(requests: int) -> float:
    """Microseconds that recording the metrics adds to one request, measured alone."""

    def nothing(environ, start_response):
        return ()

    def recorded(environ, start_response):
        # What the channel sink and ServiceRuntime.invoke do for metrics, and nothing else.
        environ[metrics.CHANNEL_KEY] = "demo-echo"
        started = perf_counter()
        metrics.observe_service("demo.echo", perf_counter() - started)
        return ()

    def loop_us(app) -> float:
        # The best of many short windows: under a figure this small, another process taking
        # the CPU for a moment would otherwise be most of what is measured.
        env = environ()
        chunk = max(requests // 10, 1)
        best = float("inf")
        for _ in range(20):
            started = time.perf_counter()
            for _ in range(chunk):
                app(env, None)
            best = min(best, (time.perf_counter() - started) / chunk)
        return best * 1e6

    return loop_us(metrics.counting(recorded)) - loop_us(nothing)


def turn_us(turns: int = 200_000) -> dict[str, float]:
    """Microseconds per yield to the hub with nothing else ready: the fair worker's
    ``take_turn`` and ``gevent.sleep(0)``, best of 10 windows each, interleaved."""
    import gevent

    from esb.server.gevent_worker import take_turn

    ways = {"take_turn": take_turn, "gevent.sleep(0)": gevent.sleep}
    best = dict.fromkeys(ways, float("inf"))
    chunk = turns // 10
    for _ in range(10):
        for name, turn in ways.items():
            started = time.perf_counter()
            for _ in range(chunk):
                turn()
            best[name] = min(best[name], (time.perf_counter() - started) / chunk)
    return {name: us * 1e6 for name, us in best.items()}


def per_request_us(apps: dict, requests: int, windows: int = 50) -> dict[str, float]:
    """Microseconds per request of each of APPS (name: WSGI app), the best of WINDOWS short
    windows of REQUESTS / WINDOWS requests each, the apps' windows interleaved.

    Short interleaved windows, because this machine is shared: a window in which another
    process took the CPU is simply not the best, and every app sees the same moments.
    """
    base = environ()

    def one_of(app):
        statuses = []

        def start_response(status, headers, exc_info=None):
            statuses.append(status)

        def one() -> None:
            env = dict(base)
            env["wsgi.input"] = io.BytesIO(BODY)
            b"".join(app(env, start_response))

        return one, statuses

    runners = {name: one_of(app) for name, app in apps.items()}
    for name, (one, statuses) in runners.items():
        for _ in range(2000):
            one()
        if statuses[-1] != "200 OK":
            raise SystemExit(f"app_cost: the {name} app answered {statuses[-1]}")
    chunk = max(requests // windows, 1)
    best = dict.fromkeys(apps, float("inf"))
    for _ in range(windows):
        for name, (one, _statuses) in runners.items():
            started = time.perf_counter()
            for _ in range(chunk):
                one()
            best[name] = min(best[name], (time.perf_counter() - started) / chunk)
    return {name: us * 1e6 for name, us in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="esb-appcost-") as tmp:
        esb = esb_app(Path(tmp))
    bare = bare_app.make_app()
    best = per_request_us(
        {"bare": bare, "esb": esb, "counted": metrics.counting(esb)}, args.requests
    )
    bare_us, esb_us, counted_us = best["bare"], best["esb"], best["counted"]
    print(f"bare falcon app: {bare_us:6.1f} us per request (best of 50 windows)")
    print(f"esb app:         {esb_us:6.1f} us per request (best of 50 windows)")
    print(f"esb adds:        {esb_us - bare_us:6.1f} us per request")
    print(f"esb app counted: {counted_us:6.1f} us per request, as a worker runs it (metrics.counting)")
    print(f"metrics alone:   {recording_us(args.requests):6.2f} us per request (best of 20, budget 1 us)")
    turns = turn_us()
    print(
        f"a turn through the hub: take_turn {turns['take_turn']:.2f} us, "
        f"gevent.sleep(0) {turns['gevent.sleep(0)']:.2f} us (best of 10)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
