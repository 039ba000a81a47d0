"""Services calling services, and the server's own endpoints, against a running server on
SQLite and PostgreSQL ODBs: invoke, invoke_async through the dispatch stream, the admin
API, `esb invoke` and /metrics."""

from __future__ import annotations

import json
from pathlib import Path

from esb.bus import Keys, enqueue
from tests.helpers import Server, esb, wait_until
from tests.integration.http_support import assert_error, deployed_server


def test_invoke_async_admin_api_and_metrics(esb_server, odb_url, monkeypatch, redis_client, cluster,
                                            tmp_path):
    server = deployed_server(esb_server, odb_url, monkeypatch)
    check_invoke_async(server, redis_client, cluster)
    check_admin_endpoints(server)
    check_esb_invoke(server)
    check_metrics(server, tmp_path)


def recorded(redis_client, key: str, count: int = 1) -> list[dict]:
    """What t.record left under KEY, once there are COUNT entries."""
    return wait_until(lambda: [json.loads(e) for e in redis_client.lrange(key, 0, -1)][:count]
                      if redis_client.llen(key) >= count else None,
                      message=f"{count} record(s) under {key}")


def check_invoke_async(server: Server, redis_client, cluster: str) -> None:
    # Under the cluster's prefix, so the cluster fixture removes it afterwards.
    key = f"esb:{cluster}:test:records"
    kicked = server.post("/t/kick", {"key": key}, headers={"X-ESB-CID": "async-cid-1"})
    assert kicked.status_code == 200, kicked.text
    assert kicked.json()["cid"] == "async-cid-1" and kicked.json()["msg_id"]
    [entry] = recorded(redis_client, key)
    # The queued message carries the cid of the request that queued it.
    assert entry == {"cid": "async-cid-1", "payload": {"key": key, "value": "kicked"},
                     "has_http": False, "has_job": False}

    # Through the admin API too: every one runs, none twice.
    many = f"esb:{cluster}:test:many"
    cids = [f"many-{i}" for i in range(20)]
    for cid in cids:
        answer = server.post("/esb/invoke/t.kick", {"key": many},
                             headers={**server.admin_headers(), "X-ESB-CID": cid})
        assert answer.status_code == 200, answer.text
    recorded(redis_client, many, count=len(cids))
    entries = [json.loads(e) for e in redis_client.lrange(many, 0, -1)]
    assert sorted(e["cid"] for e in entries) == sorted(cids)
    check_burst(redis_client, cluster)


def check_burst(redis_client, cluster: str) -> None:
    """A burst on the stream, as a scheduler makes one, with a malformed entry in it: every
    message runs once, and neither the stream nor any key holds anything of it after."""
    keys = Keys(cluster)
    burst = f"esb:{cluster}:test:burst"
    cids = [f"burst-{i}" for i in range(500)]
    ids = [enqueue(redis_client, keys, "t.record", {"key": burst}, cid=cid) for cid in cids[:250]]
    redis_client.xadd(keys.dispatch, {"id": "no-service-field"})
    ids += [enqueue(redis_client, keys, "t.record", {"key": burst}, cid=cid) for cid in cids[250:]]
    recorded(redis_client, burst, count=len(cids))
    entries = [json.loads(e) for e in redis_client.lrange(burst, 0, -1)]
    assert sorted(e["cid"] for e in entries) == sorted(cids)
    wait_until(lambda: redis_client.xlen(keys.dispatch) == 0
               and redis_client.xpending(keys.dispatch, keys.dispatch_group)["pending"] == 0,
               message="every entry of the burst acknowledged and deleted")
    left = [key for key in redis_client.scan_iter(match=f"esb:{cluster}:*", count=1000)
            if any(msg_id in key for msg_id in ids)]
    assert left == []


def check_admin_endpoints(server: Server) -> None:
    ping = server.session.get(server.url("/esb/ping"), timeout=10)
    assert ping.status_code == 200 and ping.json() == {"status": "ok"}

    wrong = {"Authorization": "Basic " + "YWRtaW46d3Jvbmc="}  # admin:wrong
    for headers in ({}, wrong):
        refused = server.session.get(server.url("/esb/status"), headers=headers, timeout=10)
        assert_error(refused, 401)
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
        assert_error(server.post("/esb/invoke/demo.echo", {"a": 1}, headers=headers), 401)
    # A channel credential is not an admin credential.
    assert_error(server.post("/esb/invoke/demo.echo", {}, auth=("alice", server.admin[1])), 401)

    def status() -> dict | None:
        answer = server.session.get(server.url("/esb/status"), headers=server.admin_headers(), timeout=10)
        assert answer.status_code == 200, answer.text
        report = answer.json()
        return report if len([w for w in report["workers"] if w["alive"]]) == 2 else None

    report = wait_until(status, message="/esb/status listing both workers")
    assert {"healthy", "workers", "scheduler"} <= set(report)
    assert all({"pid", "alive", "last_heartbeat"} <= set(w) for w in report["workers"])

    echoed = server.invoke("demo.echo", {"a": [1, 2]})
    assert echoed.status_code == 200 and echoed.json() == {"a": [1, 2]}
    assert server.invoke("demo.hello", {"name": "admin"}).json() == {"hello": "admin"}
    # The admin API runs any service, with or without a channel, under the request's cid.
    headers = {**server.admin_headers(), "X-ESB-CID": "adm-1"}
    inner = server.post("/esb/invoke/t.inner", {"n": 1}, headers=headers)
    assert inner.json() == {"n": 2, "cid": "adm-1"} and inner.headers["X-ESB-CID"] == "adm-1"
    created = server.invoke("t.created", {})
    assert created.status_code == 201 and created.headers["Location"] == "/t/orders/7"

    assert "t.nope" in assert_error(server.invoke("t.nope", {}), 404)
    assert assert_error(server.invoke("t.reject", {}), 400) == "field 'order' is required"
    failed = server.invoke("t.fail", {})
    assert_error(failed, 500)
    assert "Traceback" not in failed.text and "exploded" not in failed.text
    assert_error(server.post("/esb/invoke/demo.echo", b"{bad", headers=server.admin_headers()), 400)


def check_esb_invoke(server: Server) -> None:
    done = esb("invoke", str(server.directory), "demo.echo", '{"a":1}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"a": 1}

    hello = esb("invoke", str(server.directory), "demo.hello")
    assert hello.returncode == 0 and json.loads(hello.stdout) == {"hello": "world"}

    unknown = esb("invoke", str(server.directory), "t.nope", "{}")
    assert unknown.returncode != 0 and unknown.stdout == ""
    assert set(json.loads(unknown.stderr)) == {"error", "cid"}

    not_json = esb("invoke", str(server.directory), "demo.echo", "{a:1}")
    assert not_json.returncode != 0 and "not JSON" in not_json.stderr


def check_metrics(server: Server, tmp_path: Path) -> None:
    assert_error(server.session.get(server.url("/metrics"), timeout=10), 401)
    for _ in range(3):
        server.post("/demo/echo", {})
    server.post("/nowhere", {})
    # A job firing every second: the workers observe its firing delay.
    job = tmp_path / "metrics-tick.toml"
    job.write_text(
        '[[scheduler.job]]\nname = "t-metrics-tick"\nservice = "demo.echo"\ntype = "interval"\nseconds = 1\n'
    )
    assert server.deploy(job).returncode == 0

    def scraped() -> dict[str, float] | None:
        answer = server.session.get(server.url("/metrics"), headers=server.admin_headers(), timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.text
        for line in text.splitlines():
            assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2, line
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert "# TYPE esb_http_requests_total counter" in text
        ready = (
            values.get('esb_http_requests_total{channel="demo-echo"}', 0) >= 3
            and values.get('esb_http_errors_total{status="404"}', 0) >= 1
            and values.get("esb_job_firing_delay_seconds_count", 0) >= 1
        )
        return values if ready else None

    values = wait_until(scraped, timeout_s=30, message="/metrics counting the requests and the firing")
    assert values["esb_workers"] == 2
    # Every histogram has observations: requests by channel, services, dispatch and firings.
    assert values['esb_http_request_duration_seconds_count{channel="demo-echo"}'] >= 3
    assert values['esb_http_request_duration_seconds_bucket{channel="demo-echo",le="+Inf"}'] >= 3
    assert values['esb_http_request_duration_seconds_sum{channel="demo-echo"}'] > 0
    assert values['esb_service_duration_seconds_count{service="demo.echo"}'] >= 3
    # t.record ran for each invoke_async of check_invoke_async, through the dispatch stream.
    assert values['esb_service_duration_seconds_count{service="t.record"}'] >= 500
    assert values["esb_dispatch_delay_seconds_count"] >= 500
    assert values['esb_dispatch_runs_total{outcome="ok"}'] >= 500
    assert values["esb_job_firing_delay_seconds_count"] >= 1
