"""Metrics: counted in memory where they happen, handed to prometheus_client in the background.

prometheus_client runs in multiprocess mode: each worker writes its metrics to files of
its own under ``DIR/run/metrics/`` (the launcher empties it at every start), and /metrics,
on whichever worker it lands, sums the files of every worker of this server, the dead ones
included. So a total never falls when a worker dies, and Prometheus sees no counter reset.
``esb_workers`` is a live gauge: the arbiter removes a dead worker's file (``child_exit``).

PERF(esb): the library's multiprocess mode costs about 2 µs a counter increment and 4 µs a
histogram observation (a lock and an mmap write each), more than the 1 µs that metrics may
add to a request. So the request path only adds to the plain lists below (no locks under
gevent), and ``Publisher.flush`` hands what was counted since the last flush to the
library, once a second and when the worker stops. A worker killed with -9 loses at most its
last second of counts; a graceful stop loses nothing. Measured with ``bench/app_cost.py``
("metrics alone"): 0.6 µs a request, of which the four clock reads (request and service
duration) are 0.35 µs. The flush costs about 10 µs a label value (150 µs for 5 channels,
10 services and the dispatch delay), once a second, in the background.

prometheus_client picks its mode from ``PROMETHEUS_MULTIPROC_DIR`` when it is first
imported, so it is imported only inside the functions below, never at the import of this
module: the arbiter sets the variable first (``esb.server.application.main``).
"""

from __future__ import annotations

import os
import shutil
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from time import perf_counter
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Upper bounds in seconds. Requests and services take from ~100 µs to seconds; dispatch
# and firing delays are milliseconds when all is well and up to misfire_grace_s (30 s by
# default) when nothing could run them.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# The WSGI environ key where the channel sink leaves the name of the channel it served.
CHANNEL_KEY = "esb.channel"


def new_tally(bounds: tuple[float, ...]) -> list[float]:
    """A fixed-bucket histogram as one list: a count per bucket (the last one +Inf), then the sum.

    PERF(esb): a list indexed by ``bisect_left`` and no method call: about 0.1 µs.
    """
    return [0] * (len(bounds) + 1) + [0.0]


# What this worker counted since its last flush.
request_seconds: dict[str, list[float]] = {}  # by channel; its counts are esb_http_requests_total
service_seconds: dict[str, list[float]] = {}  # by service
http_errors: Counter[int] = Counter()  # by status code
dispatch_runs: Counter[str] = Counter()  # "ok" / "error"
# (kind, name, outcome): ("outconn.amqp", name, "confirmed" / "nacked" / "returned" / "error"),
# ("channel.amqp", name, "handled" / "failed" / "dead_lettered")
amqp_messages: Counter[tuple[str, str, str]] = Counter()
# SQL notifications: runs by (name, outcome), rows by name, run durations, last success.
notification_runs: Counter[tuple[str, str]] = Counter()
notification_rows: Counter[str] = Counter()
notification_seconds: dict[str, list[float]] = {}
notification_last_success: dict[str, float] = {}  # name -> time.time()
dispatch_delay = new_tally(DELAY_BUCKETS)
firing_delay = new_tally(DELAY_BUCKETS)


def observe_dispatch_delay(seconds: float) -> None:
    dispatch_delay[bisect_left(DELAY_BUCKETS, seconds)] += 1
    dispatch_delay[-1] += seconds


def observe_firing_delay(seconds: float) -> None:
    firing_delay[bisect_left(DELAY_BUCKETS, seconds)] += 1
    firing_delay[-1] += seconds


def observe_notification(name: str, outcome: str, rows: int, seconds: float, now: float) -> None:
    """One run of SQL notification NAME (off the request path: once a run)."""
    notification_runs[(name, outcome)] += 1
    notification_rows[name] += rows
    tally = notification_seconds.get(name)
    if tally is None:
        tally = notification_seconds[name] = new_tally(DELAY_BUCKETS)
    tally[bisect_left(DELAY_BUCKETS, seconds)] += 1
    tally[-1] += seconds
    if outcome == "ok":
        notification_last_success[name] = now


def observe_service(name: str, seconds: float) -> None:
    tally = service_seconds.get(name)
    if tally is None:
        tally = service_seconds[name] = new_tally(DURATION_BUCKETS)
    tally[bisect_left(DURATION_BUCKETS, seconds)] += 1
    tally[-1] += seconds


def counting(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """The WSGI app APP, counting and timing each request that reached a channel.

    The time is the app's: from the call to the body being ready (falcon has built it by
    then), not gunicorn's writing of it.
    """

    def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = perf_counter()
        body = app(environ, start_response)
        channel = environ.get(CHANNEL_KEY)
        if channel is not None:
            seconds = perf_counter() - started
            tally = request_seconds.get(channel)
            if tally is None:
                tally = request_seconds[channel] = new_tally(DURATION_BUCKETS)
            tally[bisect_left(DURATION_BUCKETS, seconds)] += 1
            tally[-1] += seconds
        return body

    return counted


# -- the directory, set up by the launcher and the arbiter -------------------------------


def directory(run_dir: Path) -> Path:
    return run_dir / "metrics"


def empty_directory(run_dir: Path) -> Path:
    """Make DIR/run/metrics/ empty: a new start counts from zero. The launcher calls it."""
    path = directory(run_dir)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_directory(run_dir: Path) -> None:
    """Put prometheus_client in multiprocess mode on this server's directory, for this
    process and the workers it forks. Call before anything imports prometheus_client."""
    path = directory(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)


def process_dead(pid: int) -> None:
    """In the arbiter, when worker PID exited however: its live gauges (esb_workers) go."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


# -- the library side, in the worker ---------------------------------------------------


class Publisher:
    """Hands this worker's counts to prometheus_client. Built in the worker after fork.

    Raises RuntimeError when prometheus_client is not in multiprocess mode: each worker
    would then count for itself and /metrics would show one worker's share.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge, Histogram, values

        if not os.environ.get(MULTIPROC_ENV) or values.ValueClass is values.MutexValue:
            raise RuntimeError(f"prometheus_client is not in multiprocess mode ({MULTIPROC_ENV} unset)")
        self.http_requests = PromCounter(
            "esb_http_requests", "Requests that reached a channel.", ["channel"], registry=None
        )
        self.http_errors = PromCounter(
            "esb_http_errors", "Error answers by status.", ["status"], registry=None
        )
        self.dispatch_runs = PromCounter(
            "esb_dispatch_runs", "Dispatched invocations run, by outcome.", ["outcome"], registry=None
        )
        self.request_seconds = Histogram(
            "esb_http_request_duration_seconds",
            "Time in the app of a request that reached a channel, by channel.",
            ["channel"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.service_seconds = Histogram(
            "esb_service_duration_seconds",
            "Time in a service's handle(), by service, however it was invoked.",
            ["service"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.dispatch_delay = Histogram(
            "esb_dispatch_delay_seconds",
            "From a dispatched message's enqueueing to the start of its service.",
            buckets=DELAY_BUCKETS,
            registry=None,
        )
        self.firing_delay = Histogram(
            "esb_job_firing_delay_seconds",
            "From a job firing's due time to the start of its service.",
            buckets=DELAY_BUCKETS,
            registry=None,
        )
        self.amqp_messages = PromCounter(
            "esb_amqp_messages",
            "AMQP messages by outgoing connection or channel, and outcome.",
            ["kind", "name", "outcome"],
            registry=None,
        )
        self.notification_runs = PromCounter(
            "esb_notification_runs", "SQL notification runs, by outcome.", ["notification", "outcome"],
            registry=None,
        )
        self.notification_rows = PromCounter(
            "esb_notification_rows", "Rows SQL notifications delivered.", ["notification"], registry=None
        )
        self.notification_seconds = Histogram(
            "esb_notification_run_duration_seconds",
            "Duration of SQL notification runs.",
            ["notification"],
            buckets=DELAY_BUCKETS,
            registry=None,
        )
        # Seconds since the last successful run: time() - this (the newest of this server's workers).
        self.notification_last_success = Gauge(
            "esb_notification_last_success_timestamp_seconds",
            "When an SQL notification last ran successfully on this server (Unix time).",
            ["notification"],
            multiprocess_mode="max",
            registry=None,
        )
        self.workers = Gauge(
            "esb_workers", "Workers of this server running.", multiprocess_mode="livesum", registry=None
        )
        self.workers.set(1)

    def flush(self) -> None:
        """Add what was counted since the last flush. Takes the counts before the first
        library call, so nothing counted meanwhile is lost or added twice."""
        requests, errors, runs, services, delays = _take_counts()
        amqp = dict(amqp_messages)
        amqp_messages.clear()
        for labels, count in amqp.items():
            self.amqp_messages.labels(*labels).inc(count)
        self._flush_notifications()
        for channel, tally in requests.items():
            self.http_requests.labels(channel).inc(sum(tally[:-1]))
            _add(self.request_seconds.labels(channel), tally)
        for status, count in errors.items():
            self.http_errors.labels(str(status)).inc(count)
        for outcome, count in runs.items():
            self.dispatch_runs.labels(outcome).inc(count)
        for service, tally in services.items():
            _add(self.service_seconds.labels(service), tally)
        _add(self.dispatch_delay, delays[0])
        _add(self.firing_delay, delays[1])


    def _flush_notifications(self) -> None:
        runs, rows = dict(notification_runs), dict(notification_rows)
        seconds, success = dict(notification_seconds), dict(notification_last_success)
        notification_runs.clear()
        notification_rows.clear()
        notification_seconds.clear()
        notification_last_success.clear()
        for (name, outcome), count in runs.items():
            self.notification_runs.labels(name, outcome).inc(count)
        for name, count in rows.items():
            self.notification_rows.labels(name).inc(count)
        for name, tally in seconds.items():
            _add(self.notification_seconds.labels(name), tally)
        for name, moment in success.items():
            self.notification_last_success.labels(name).set(moment)


def _take_counts() -> tuple[
    dict[str, list[float]], dict[int, int], dict[str, int], dict[str, list[float]], tuple[list[float], ...]
]:
    """The counts since the last flush, and zero in their place. No greenlet switch can
    happen in here: it calls nothing that yields."""
    requests, services = dict(request_seconds), dict(service_seconds)
    request_seconds.clear()
    service_seconds.clear()
    errors, runs = dict(http_errors), dict(dispatch_runs)
    http_errors.clear()
    dispatch_runs.clear()
    delays = (dispatch_delay[:], firing_delay[:])
    dispatch_delay[:] = new_tally(DELAY_BUCKETS)
    firing_delay[:] = new_tally(DELAY_BUCKETS)
    return requests, errors, runs, services, delays


def _add(histogram: Any, tally: list[float]) -> None:
    """Add a tally to a histogram (or its child for one label value) of prometheus_client.

    The library has no public call to add many observations at once; its buckets and sum
    are the private ``_buckets`` (one per bound, not cumulative) and ``_sum``, unchanged
    since the multiprocess mode exists. tests/unit/test_metrics.py fails if that changes.
    """
    for bucket, count in zip(histogram._buckets, tally[:-1], strict=True):
        if count:
            bucket.inc(count)
    if tally[-1]:
        histogram._sum.inc(tally[-1])


def render() -> bytes:
    """Prometheus text for every worker of this server, alive or dead, from their files."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


__all__ = [
    "CHANNEL_KEY",
    "Publisher",
    "counting",
    "empty_directory",
    "observe_dispatch_delay",
    "observe_firing_delay",
    "observe_notification",
    "observe_service",
    "process_dead",
    "render",
    "use_directory",
]
