"""A worker killed with -9 takes none of the counted requests with it: /metrics totals never
fall, so Prometheus sees no counter reset."""

from __future__ import annotations

import os
import signal

import requests
from prometheus_client.multiprocess import MultiProcessCollector

from tests.helpers import Server, wait_until

CHANNEL = 'esb_http_requests_total{channel="demo-echo"}'


def scrape(server: Server) -> dict[str, float]:
    answer = requests.get(
        server.url("/metrics"), headers={**server.admin_headers(), "Connection": "close"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in answer.text.splitlines()
        if line and not line.startswith("#")
    }


def counted_in_files(server: Server, pid: int | str = "*") -> float:
    """The echo requests that worker PID (every worker: "*") wrote to its file."""
    paths = (server.directory / "run" / "metrics").glob(f"counter_{pid}.db")
    for metric in MultiProcessCollector.merge([str(path) for path in paths]):
        for sample in metric.samples:
            if sample.name == "esb_http_requests_total" and sample.labels == {"channel": "demo-echo"}:
                return sample.value
    return 0.0


def send(server: Server, count: int) -> None:
    """COUNT echo requests on fresh connections, which land on either worker."""
    for _ in range(count):
        answer = requests.post(server.url("/demo/echo"), json={}, headers={"Connection": "close"}, timeout=5)
        assert answer.status_code == 200, answer.text


def test_request_totals_never_fall_when_a_worker_is_killed(esb_server):
    server = esb_server(workers=2)
    seen: list[float] = []

    def total_is(expected: int) -> bool:
        values = scrape(server)
        seen.append(values.get(CHANNEL, 0.0))
        return seen[-1] == expected and values["esb_workers"] == 2

    send(server, 300)
    # Each worker hands its counts to the shared files within a second.
    wait_until(lambda: total_is(300), message="both workers' 300 requests in /metrics")
    before = set(server.worker_pids())
    victim = min(before)
    # The victim served some of them: its death would lower a total summed from the living.
    assert 0 < counted_in_files(server, victim) < 300
    os.kill(victim, signal.SIGKILL)
    server.replacement_of(victim, before)
    # The dead worker's counts stay; its live gauge went with it (esb_workers is 2, not 3).
    wait_until(lambda: total_is(300), message="the total after the kill")
    send(server, 100)
    wait_until(lambda: total_is(400), message="the replacement counting on top of the dead worker")

    assert seen == sorted(seen), f"esb_http_requests_total fell: {seen}"
    assert victim not in server.worker_pids()


def test_a_graceful_stop_loses_no_count(esb_server):
    """Requests just before `esb stop`, inside the workers' last second: their stop() flushes."""
    server = esb_server(workers=2)
    send(server, 200)
    server.stop()
    assert counted_in_files(server) == 200
