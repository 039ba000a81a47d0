"""Redis goes away and comes back: channels keep serving, async work answers 503 with a
clear error meanwhile, and everything recovers without a restart."""

from __future__ import annotations

import time

import redis
import requests

from tests.conftest import set_conf
from tests.faults.test_workers import deploy_services
from tests.helpers import wait_until


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
