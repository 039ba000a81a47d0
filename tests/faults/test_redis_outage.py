"""Redis goes away and comes back: channels keep serving, async work answers 503 with a
clear error meanwhile, and everything recovers without a restart."""

from __future__ import annotations

import json
import os
import signal
import time

import redis
import requests

from esb.config import load_server_config
from tests.conftest import set_conf
from tests.faults.test_workers import deploy_services
from tests.helpers import esb, pid_alive, wait_until


def test_redis_restart_is_survived(esb_server, private_redis, tmp_path):
    private_redis.start()
    server = esb_server(start=False)
    set_conf(server.directory, "redis", "url", private_redis.url)
    server.start()
    deploy_services(server, tmp_path)
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    key = f"esb:{server.cluster}:test:outage"

    private_redis.kill()
    # HTTP channels need no Redis.
    assert requests.post(server.url("/demo/hello"), json={}, timeout=10).status_code == 200
    # Async work cannot be queued: a clear 503, not a traceback.
    refused = requests.post(server.url("/t/enqueue"), json={"key": key, "seconds": 0}, timeout=30)
    assert refused.status_code == 503, refused.text
    assert set(refused.json()) == {"error", "cid"} and "enqueue" in refused.json()["error"]
    assert server.status()["healthy"] is False

    time.sleep(2)
    private_redis.start()
    accepted = wait_until(
        lambda: requests.post(server.url("/t/enqueue"), json={"key": key, "seconds": 0}, timeout=10)
        .status_code == 200,
        timeout_s=30, message="invoke_async accepted again",
    )
    assert accepted
    wait_until(lambda: client.llen(key + ":done") >= 1, timeout_s=30,
               message="a worker consumed the stream again after the restart")
    wait_until(lambda: len([w for w in server.status()["workers"] if w["alive"]]) == 2,
               message="both workers' heartbeats are back")


def test_silent_redis_is_reported_at_once_and_survived(esb_server, private_redis, tmp_path):
    """A Redis that accepts connections but does not answer (SIGSTOP): nothing dies, status
    names Redis within about a staleness period, and everything carries on after SIGCONT."""
    private_redis.start()
    server = esb_server(start=False)
    set_conf(server.directory, "redis", "url", private_redis.url)
    server.start()
    deploy_services(server, tmp_path)
    wait_until(lambda: server.status()["healthy"], timeout_s=30, message="healthy before the outage")
    stale_after_s = load_server_config(server.directory).observe.stale_after_s
    workers = sorted(server.worker_pids())
    scheduler = scheduler_pid(server)
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    key = f"esb:{server.cluster}:test:silent"

    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        # The bound the issue asks for is stale_after_s + 1 s; the deadline here is 3 s over
        # the staleness period so that a loaded test machine does not fail it spuriously.
        status = esb("status", str(server.directory), "--json", timeout_s=stale_after_s + 1)
        assert status.returncode != 0, status.stdout
        problems = json.loads(status.stdout)["problems"]
        assert any(p.startswith("Redis unreachable") for p in problems), problems
        # HTTP channels need no Redis.
        assert requests.post(server.url("/demo/hello"), json={}, timeout=10).status_code == 200
        # The heartbeats noticed, in the words every loop uses, and nothing died of it.
        wait_until(lambda: "Redis unreachable: heartbeat" in server.log("server.log"), timeout_s=30,
                   message="the workers' heartbeats report the outage")
        wait_until(lambda: "Redis unreachable: heartbeat" in server.log("scheduler.log"), timeout_s=30,
                   message="the scheduler's heartbeat reports the outage")
        assert sorted(server.worker_pids()) == workers
        assert pid_alive(scheduler) and scheduler_pid(server) == scheduler
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)

    wait_until(lambda: server.status()["healthy"], timeout_s=30, message="healthy after SIGCONT")
    assert sorted(server.worker_pids()) == workers
    assert pid_alive(scheduler) and scheduler_pid(server) == scheduler
    assert "Redis works again: heartbeat" in server.log("server.log")
    assert requests.post(server.url("/demo/hello"), json={}, timeout=10).status_code == 200
    accepted = requests.post(server.url("/t/enqueue"), json={"key": key, "seconds": 0}, timeout=30)
    assert accepted.status_code == 200, accepted.text
    wait_until(lambda: client.llen(key + ":done") >= 1, timeout_s=30,
               message="an invoke_async made after SIGCONT ran")


def scheduler_pid(server) -> int:
    return json.loads((server.directory / "run" / "children.json").read_text())["scheduler"]
