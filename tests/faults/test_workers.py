"""Killing and freezing workers: replacements rebuild everything, dispatched work survives,
and a service that holds the event loop is named in the log."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import requests

from tests.helpers import esb, pid_alive, wait_until

SERVICES = '''
import os
import shutil
import time

from esb import Service


class Where(Service):
    name = "t.where"

    def handle(self):
        self.response.payload = {"pid": os.getpid()}


class Slow(Service):
    """Records its start and end in Redis so the test can tell who ran it, and how often."""

    name = "t.slow"

    def handle(self):
        key = self.request.payload["key"]
        self.redis.rpush(key + ":started", os.getpid())
        time.sleep(self.request.payload.get("seconds", 3))
        self.redis.rpush(key + ":done", os.getpid())


class Enqueue(Service):
    name = "t.enqueue"

    def handle(self):
        self.response.payload = {"id": self.invoke_async("t.slow", self.request.payload)}


class Hog(Service):
    """Holds the CPU without yielding: what a badly written service does to a gevent loop."""

    name = "t.hog"

    def handle(self):
        deadline = time.monotonic() + self.request.payload.get("seconds", 60)
        while time.monotonic() < deadline:
            pass
'''

CHANNELS = """
[[channel.http]]
name = "t-where"
path = "/t/where"
service = "t.where"

[[channel.http]]
name = "t-enqueue"
path = "/t/enqueue"
service = "t.enqueue"

[[channel.http]]
name = "t-hog"
path = "/t/hog"
service = "t.hog"
"""


def deploy_services(server, tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    (files / "faults.py").write_text(SERVICES)
    (files / "faults.toml").write_text(CHANNELS)
    assert server.deploy(files / "faults.py", files / "faults.toml").returncode == 0
    wait_until(lambda: requests.post(server.url("/t/where"), timeout=5).status_code == 200)


def pids_answering(server, tries: int = 40) -> set[int]:
    pids = set()
    for _ in range(tries):
        response = requests.post(server.url("/t/where"), timeout=5, headers={"Connection": "close"})
        assert response.status_code == 200, response.text
        pids.add(response.json()["pid"])
    return pids


def test_killed_worker_is_replaced_and_serves_everything(esb_server, odb_url, tmp_path):
    server = esb_server(odb=odb_url, workers=2)
    deploy_services(server, tmp_path)
    before = server.worker_pids()
    assert len(before) == 2
    victim = before[0]
    os.kill(victim, signal.SIGKILL)

    replacement = server.replacement_of(victim, before)
    # The replacement rebuilt its services and channels from the ODB: it answers them.
    wait_until(
        lambda: replacement in pids_answering(server),
        timeout_s=30,
        message="the replacement answers the hot-deployed channel",
    )
    assert requests.post(server.url("/demo/hello"), json={"name": "x"}, timeout=5).json() == {"hello": "x"}

    def dead_worker_gone() -> bool:
        pids = {w["pid"] for w in server.status()["workers"]}
        return victim not in pids and replacement in pids

    wait_until(dead_worker_gone, message="status drops the dead worker")


def test_async_message_of_a_killed_worker_runs_elsewhere_once(esb_server, redis_client, cluster, tmp_path):
    server = esb_server(workers=2)
    deploy_services(server, tmp_path)
    key = f"esb:{cluster}:test:slow"
    response = requests.post(server.url("/t/enqueue"), json={"key": key, "seconds": 3}, timeout=5)
    assert response.status_code == 200, response.text

    first = int(wait_until(lambda: redis_client.lindex(key + ":started", 0), message="slow service started"))
    os.kill(first, signal.SIGKILL)

    wait_until(
        lambda: redis_client.llen(key + ":done") == 1,
        timeout_s=30,
        message="the message was reclaimed and finished by another worker",
    )
    runner = int(redis_client.lindex(key + ":done", 0))
    assert runner != first
    time.sleep(4)  # long enough for a wrong second delivery to show
    assert redis_client.llen(key + ":done") == 1


def test_hung_worker_is_killed_named_and_replaced(esb_server, tmp_path):
    server = esb_server(workers=2, timeout=4, conf={("observe", "block_warn_s"): 1})
    deploy_services(server, tmp_path)
    before = set(server.worker_pids())
    try:
        requests.post(server.url("/t/hog"), json={"seconds": 60}, timeout=30)
    except requests.RequestException:
        pass  # the worker holding the request is killed: the connection drops
    wait_until(
        lambda: "service t.hog" in server.log() and "has held the event loop of worker" in server.log(),
        timeout_s=30,
        message="the loop-block monitor names the service",
    )
    wait_until(
        lambda: "WORKER TIMEOUT: service t.hog" in server.log(),
        timeout_s=30,
        message="the WORKER TIMEOUT names the service",
    )
    wait_until(
        lambda: len(set(server.worker_pids()) - before) == 1 and len(server.worker_pids()) == 2,
        timeout_s=30,
        message="the arbiter replaced the hung worker",
    )
    assert len(pids_answering(server)) >= 1


def test_stopped_worker_past_timeout_is_replaced(esb_server, tmp_path):
    server = esb_server(workers=2, timeout=3)
    deploy_services(server, tmp_path)
    before = set(server.worker_pids())
    victim = min(before)
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(
            lambda: not pid_alive(victim), timeout_s=30, message="the arbiter killed the stopped worker"
        )
    finally:
        if pid_alive(victim):
            os.kill(victim, signal.SIGCONT)
    wait_until(lambda: len(server.worker_pids()) == 2, message="a replacement worker runs")
    replacement = (set(server.worker_pids()) - before).pop()
    wait_until(lambda: replacement in pids_answering(server), timeout_s=30, message="the replacement answers")


def test_stop_leaves_no_process(esb_server):
    server = esb_server(embedded_redis=True)

    def whole_tree() -> list[int] | None:
        # The server's start waits for its workers; the scheduler may still be starting.
        pids = server.all_pids()
        return pids if len(pids) >= 6 else None

    # launcher (with the pickup thread), arbiter, 2 workers, scheduler, embedded redis
    pids = wait_until(whole_tree, message="the launcher, arbiter, 2 workers, scheduler and Redis run")
    server.stop()
    assert [pid for pid in pids if pid_alive(pid)] == []


def test_embedded_redis_that_dies_is_restarted(esb_server, tmp_path):
    server = esb_server(embedded_redis=True)
    import json

    redis_pid = json.loads((server.directory / "run" / "children.json").read_text())["redis"]
    os.kill(redis_pid, signal.SIGKILL)

    def new_redis() -> bool:
        pid = json.loads((server.directory / "run" / "children.json").read_text())["redis"]
        return pid != redis_pid and pid_alive(pid)

    wait_until(new_redis, timeout_s=5, message="the launcher restarted the embedded Redis")
    deploy_services(server, tmp_path)  # deploy notices and the dispatch stream work again
    wait_until(lambda: any(w["alive"] for w in server.status()["workers"]), message="heartbeats resume")


def status_exit(server) -> int:
    return esb("status", str(server.directory)).returncode


def test_replacement_that_cannot_build_answers_503_until_it_can(esb_server, tmp_path):
    """A replacement worker that cannot write under run/ (its loading marker, written
    before each module import) is not ready: it answers 503, never 404, status says so,
    and once the fault is gone it builds its generation by itself."""
    server = esb_server(workers=2)
    deploy_services(server, tmp_path)
    loading = server.directory / "run" / "loading"
    shutil.rmtree(loading, ignore_errors=True)
    loading.write_text("not a directory\n")  # mkdir fails for root too
    before = server.worker_pids()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    server.replacement_of(victim, before)

    def answers() -> list[int]:
        return [
            requests.post(server.url("/t/where"), timeout=5, headers={"Connection": "close"}).status_code
            for _ in range(20)
        ]

    def not_ready_reported() -> bool:
        problems = server.status()["problems"]
        return any("not ready" in p for p in problems)

    codes: list[int] = []

    def replacement_answered() -> bool:
        codes.extend(answers())
        return bool({404, 503} & set(codes))

    wait_until(replacement_answered, timeout_s=15, message="the replacement answered a request")
    assert 404 not in codes, codes
    assert set(codes) <= {200, 503}, codes
    wait_until(not_ready_reported, timeout_s=15, message="status names the worker that is not ready")
    assert status_exit(server) != 0

    loading.unlink()
    fault_gone = time.monotonic()
    wait_until(lambda: set(answers()) == {200}, timeout_s=20, message="every request answers 200")
    wait_until(lambda: status_exit(server) == 0, timeout_s=20 - (time.monotonic() - fault_gone),
               message="esb status exits 0 within 20 s of the fault going")
