"""Metrics: cheap per-worker counters, published with the heartbeat, summed for /metrics.

A Prometheus scrape lands on one worker of many; each worker's counters travel in its
heartbeat hash, so any worker can answer for all of them.
"""

from __future__ import annotations

import json
from collections import Counter

import redis

from esb.bus import Keys

# PERF(esb): plain Counter increments on the request path; no locks under gevent.
http_requests: Counter[str] = Counter()  # by channel name
http_errors: Counter[int] = Counter()  # by status code
dispatch_runs: Counter[str] = Counter()  # "ok" / "error"


def snapshot() -> str:
    """This worker's counters as one JSON string for its heartbeat hash."""
    return json.dumps(
        {
            "http_requests": dict(http_requests),
            "http_errors": {str(k): v for k, v in http_errors.items()},
            "dispatch_runs": dict(dispatch_runs),
        }
    )


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def render(client: redis.Redis, keys: Keys) -> str:
    """Prometheus text for every live worker of the cluster."""
    requests: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    workers = 0
    for key in client.scan_iter(match=keys.worker_heartbeat_pattern, count=500):
        raw = client.hget(key, "metrics")
        if not raw:
            continue
        workers += 1
        data = json.loads(raw)
        requests.update(data.get("http_requests", {}))
        errors.update(data.get("http_errors", {}))
        runs.update(data.get("dispatch_runs", {}))
    lines = [
        "# HELP esb_workers Workers with a live heartbeat.",
        "# TYPE esb_workers gauge",
        f"esb_workers {workers}",
        "# HELP esb_http_requests_total Requests that reached a channel.",
        "# TYPE esb_http_requests_total counter",
    ]
    lines += [f'esb_http_requests_total{{channel="{_label(k)}"}} {v}' for k, v in sorted(requests.items())]
    lines += ["# HELP esb_http_errors_total Error answers by status.", "# TYPE esb_http_errors_total counter"]
    lines += [f'esb_http_errors_total{{status="{k}"}} {v}' for k, v in sorted(errors.items())]
    lines += [
        "# HELP esb_dispatch_runs_total Dispatched invocations run, by outcome.",
        "# TYPE esb_dispatch_runs_total counter",
    ]
    lines += [f'esb_dispatch_runs_total{{outcome="{k}"}} {v}' for k, v in sorted(runs.items())]
    return "\n".join(lines) + "\n"
