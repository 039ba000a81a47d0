"""User code on the dispatch path never chooses a worker's fate: services that
raise SystemExit or KeyboardInterrupt are failed runs, a service that kills its worker ends
in the dead-letter stream after max_deliveries, a busy worker keeps its messages, and
invoke_async of a service deployed nowhere fails at once."""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest
import requests

from esb.bus import Keys, dispatch
from esb.config import load_server_config
from esb.odb import MODULE, OdbStore
from tests.helpers import Server, esb, pid_alive, wait_until
from tests.integration.http_support import DEPLOYABLES


def poisoned_server(esb_server, **kwargs) -> Server:
    server = esb_server(**kwargs)
    done = server.deploy(DEPLOYABLES / "poison.py")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    wait_until(lambda: kick(server, "poison.sleep", {"key": "warmup", "seconds": 0}).get("msg_id"),
               message="poison services deployed")
    return server


def kick(server: Server, service: str, payload: dict) -> dict:
    answer = server.invoke("poison.kick", {"service": service, "payload": payload})
    assert answer.status_code == 200, answer.text
    return answer.json()


def serves(server: Server) -> bool:
    """A channel answers (the quickstart's demo channel)."""
    response = requests.post(server.url("/demo/hello"), json={"name": "x"}, timeout=10)
    return response.status_code == 200 and response.json() == {"hello": "x"}


class Availability:
    """Asks a channel on every poll of a wait: while workers are being killed a request may be
    cut with its worker, but most answer and the server never stops answering."""

    def __init__(self, server: Server):
        self.server = server
        self.answers: list[bool] = []

    def poll(self) -> bool:
        try:
            self.answers.append(serves(self.server))
        except requests.RequestException:
            self.answers.append(False)
        return self.answers[-1]

    def check(self) -> None:
        assert self.answers and sum(self.answers) >= 0.8 * len(self.answers), self.answers
        # A worker may be dying of the poison at this very moment, taking one connection
        # with it; the server answers again at once.
        wait_until(self.poll, timeout_s=10, interval_s=0.1, message="the server answers")


def stream_drained(redis_client, keys: Keys) -> bool:
    return (redis_client.xlen(keys.dispatch) == 0
            and redis_client.xpending(keys.dispatch, keys.dispatch_group)["pending"] == 0)


def runs(redis_client, key: str) -> int:
    return int(redis_client.get(key + ":runs") or 0)


@pytest.mark.parametrize(
    ("service", "payload"),
    [
        ("poison.exit", {"code": 0}),
        ("poison.exit", {"code": 1}),
        ("poison.exit", {"code": 3}),
        ("poison.interrupt", {}),
    ],
    ids=["system_exit_0", "system_exit_1", "system_exit_3", "keyboard_interrupt"],
)
def test_dispatched_service_raising_system_exit_or_keyboard_interrupt_is_a_failed_run(
    esb_server, redis_client, cluster, service, payload
):
    server = poisoned_server(esb_server, workers=2)
    keys = Keys(cluster)
    before = sorted(server.worker_pids())
    key = f"esb:{cluster}:test:{service}"
    for _ in range(3):  # whichever worker takes each, none dies
        assert kick(server, service, {**payload, "key": key})["msg_id"]
    wait_until(lambda: runs(redis_client, key) == 3, timeout_s=30, message="the three runs happened")
    wait_until(lambda: stream_drained(redis_client, keys), message="the messages were finished")
    assert serves(server)
    assert sorted(server.worker_pids()) == before
    assert runs(redis_client, key) == 3  # finished, so never redelivered
    wait_until(lambda: server.log().count(f"service {service} failed with ") >= 3,
               message="each failed run logged")
    assert "Traceback" in server.log()
    assert redis_client.xlen(keys.dead_letters) == 0


def test_dispatched_service_calling_os_exit_ends_in_dead_letters(esb_server, redis_client, cluster):
    server = poisoned_server(esb_server, workers=2)
    keys = Keys(cluster)
    key = f"esb:{cluster}:test:hard-exit"
    kicked = kick(server, "poison.hard_exit", {"key": key, "code": 1})
    availability = Availability(server)

    def dead_lettered() -> bool:
        availability.poll()
        return redis_client.xlen(keys.dead_letters) == 1

    wait_until(dead_lettered, timeout_s=90, interval_s=0.3, message="the message was dead-lettered")
    availability.check()
    assert runs(redis_client, key) == 3  # max_deliveries: each run killed its worker
    assert stream_drained(redis_client, keys)
    wait_until(lambda: len(server.worker_pids()) == 2, message="the dead workers were replaced")

    status = esb("status", str(server.directory), "--json")
    assert status.returncode != 0
    facts = json.loads(status.stdout)
    assert facts["dispatch"]["dead_letters"] == 1 and facts["dispatch"]["worker_deaths_last_min"] == 3
    assert any("dead-letter" in problem for problem in facts["problems"])
    listed = esb("dead-letters", str(server.directory), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert letter["service"] == "poison.hard_exit" and letter["msg_id"] == kicked["msg_id"]
    assert letter["deliveries"] == 3 and letter["payload"] == {"key": key, "code": 1}
    assert "without finishing" in letter["last_error"]
    assert "poison.hard_exit" in esb("dead-letters", str(server.directory)).stdout

    # A restart does not bring the fault back: the message stays dead.
    server.stop()
    server.start()
    pids = sorted(server.worker_pids())
    for _ in range(20):
        assert serves(server)
    assert stream_drained(redis_client, keys)
    assert runs(redis_client, key) == 3 and redis_client.xlen(keys.dead_letters) == 1
    assert sorted(server.worker_pids()) == pids

    # Fixed, then retried: it runs once more and succeeds.
    redis_client.set(key + ":fixed", "1")
    retried = esb("dead-letters", str(server.directory), "retry", letter["id"])
    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: redis_client.get(key + ":ok") == "1", timeout_s=30, message="the retried message ran")
    wait_until(lambda: stream_drained(redis_client, keys), message="the retried message finished")
    assert redis_client.xlen(keys.dead_letters) == 0
    assert json.loads(esb("status", str(server.directory), "--json").stdout)["dispatch"]["dead_letters"] == 0
    assert esb("dead-letters", str(server.directory), "retry", letter["id"]).returncode != 0


def test_dead_letter_can_be_dropped(esb_server, redis_client, cluster):
    server = poisoned_server(esb_server, workers=1, conf={("dispatch", "max_deliveries"): 1})
    keys = Keys(cluster)
    key = f"esb:{cluster}:test:drop"
    kick(server, "poison.hard_exit", {"key": key})
    wait_until(lambda: redis_client.xlen(keys.dead_letters) == 1, timeout_s=60, message="dead-lettered")
    assert runs(redis_client, key) == 1
    [letter] = json.loads(esb("dead-letters", str(server.directory), "list", "--json").stdout)
    dropped = esb("dead-letters", str(server.directory), "drop", letter["id"])
    assert dropped.returncode == 0, dropped.stderr
    assert redis_client.xlen(keys.dead_letters) == 0
    assert "no dead letters" in esb("dead-letters", str(server.directory), "list").stdout
    assert esb("dead-letters", str(server.directory), "drop", letter["id"]).returncode != 0


def test_dispatched_service_calling_os_exit_3_does_not_halt_the_server(esb_server, redis_client, cluster):
    """Exit code 3 is gunicorn's "worker failed to boot"; from a booted worker it is a death."""
    server = poisoned_server(esb_server, workers=2, conf={("dispatch", "max_deliveries"): 2})
    keys = Keys(cluster)
    key = f"esb:{cluster}:test:exit-3"
    kick(server, "poison.hard_exit", {"key": key, "code": 3})
    availability = Availability(server)

    def dead_lettered() -> bool:
        availability.poll()
        return redis_client.xlen(keys.dead_letters) == 1

    wait_until(dead_lettered, timeout_s=60, interval_s=0.3, message="the message was dead-lettered")
    availability.check()
    assert runs(redis_client, key) == 2
    wait_until(lambda: len(server.worker_pids()) == 2, message="the dead workers were replaced")
    assert server.proc.poll() is None
    assert "exited 3 after it had booted" in server.log()


def test_dispatched_service_holding_the_loop_past_reclaim_idle_runs_once(esb_server, redis_client, cluster):
    # reclaim_idle_s 1 s, [main] timeout 30 s: the hog holds its loop 6 s.
    server = poisoned_server(esb_server, workers=2, timeout=30, conf={("dispatch", "reclaim_idle_s"): 1})
    keys = Keys(cluster)
    before = sorted(server.worker_pids())
    key = f"esb:{cluster}:test:hog"
    kick(server, "poison.hog", {"key": key, "seconds": 6})
    wait_until(lambda: redis_client.get(key + ":done") == "1", timeout_s=60, message="the hog finished")
    wait_until(lambda: stream_drained(redis_client, keys), message="the hog's message finished")
    assert runs(redis_client, key) == 1
    assert "reclaimed message" not in server.log()
    assert sorted(server.worker_pids()) == before


def test_message_of_a_stopped_worker_is_reclaimed(esb_server, redis_client, cluster):
    """SIGSTOP freezes the liveness thread too: its key expires and another worker takes over."""
    server = poisoned_server(esb_server, workers=2, timeout=60, conf={("dispatch", "reclaim_idle_s"): 1})
    keys = Keys(cluster)
    key = f"esb:{cluster}:test:stopped"
    kick(server, "poison.sleep", {"key": key, "seconds": 2})
    first = int(wait_until(lambda: redis_client.lindex(key + ":pids", 0), message="the sleeper started"))
    os.kill(first, signal.SIGSTOP)
    try:
        wait_until(lambda: redis_client.get(key + ":done") == "1", timeout_s=30,
                   message="another worker reclaimed and finished the message")
        assert int(redis_client.lindex(key + ":pids", 1)) != first
    finally:
        if pid_alive(first):
            os.kill(first, signal.SIGCONT)
    wait_until(lambda: stream_drained(redis_client, keys), message="the message finished")


def test_invoke_async_of_a_service_deployed_nowhere_fails_at_once(esb_server, redis_client, cluster):
    server = poisoned_server(esb_server, workers=1)
    keys = Keys(cluster)
    answer = kick(server, "no.such.service", {"key": "x"})
    assert "no.such.service" in answer["not_found"]
    # Nothing of it on the stream (the warm-up's message may still be finishing there).
    entries = redis_client.xrange(keys.dispatch)
    assert not [fields for _id, fields in entries if fields.get("service") == "no.such.service"], entries


def test_worker_crash_loop_turns_status_unhealthy(esb_server):
    server = esb_server(workers=2)
    for _ in range(4):
        before = server.worker_pids()
        victim = max(before)
        os.kill(victim, signal.SIGKILL)
        server.replacement_of(victim, before)
    status = esb("status", str(server.directory), "--json")
    assert status.returncode != 0
    facts = json.loads(status.stdout)
    assert facts["dispatch"]["worker_deaths_last_min"] == 4
    assert "4 worker deaths in the last minute" in facts["problems"]
    assert "4 worker deaths in the last minute" in esb("status", str(server.directory)).stdout


def test_scheduled_job_raising_system_exit_records_its_error(esb_server, redis_client, cluster, tmp_path):
    server = poisoned_server(esb_server, workers=2)
    before = sorted(server.worker_pids())
    key = f"esb:{cluster}:test:job-exit"
    job = tmp_path / "exitjob.toml"
    job.write_text(
        '[[scheduler.job]]\nname = "exit-job"\nservice = "poison.exit"\ntype = "interval"\nseconds = 1\n'
        f'payload = {{ code = 3, key = "{key}" }}\n'
    )
    assert server.deploy(job).returncode == 0

    def job_error() -> str | None:
        jobs = server.status()["scheduler"]["jobs"]
        return next((j["last_error"] for j in jobs if j["name"] == "exit-job" and j["runs"] >= 2), None)

    assert wait_until(job_error, timeout_s=60, message="the job's runs recorded").startswith("SystemExit")
    assert serves(server)
    assert sorted(server.worker_pids()) == before


LATE_MODULE = '''
from esb import Service


class Late(Service):
    name = "late.mark"

    def handle(self):
        self.redis.set(self.request.payload["key"], "ran")
'''


def test_a_message_for_a_service_the_worker_has_not_loaded_yet_runs(esb_server, redis_client, cluster):
    """A message taken a moment before its service's deploy notice reaches the worker: the
    worker looks at the ODB's newest generation before failing it. Here the module is
    written to the ODB with no notice at all, so only that look can find it (the worker's
    own ODB poll comes every 5 s)."""
    server = esb_server(workers=1)
    odb = OdbStore(load_server_config(server.directory).odb_url)
    try:
        odb.put(MODULE, "late", LATE_MODULE)
    finally:
        odb.dispose()
    key = f"late:{uuid.uuid4().hex}"
    dispatch.enqueue(redis_client, Keys(cluster), "late.mark", {"key": key})
    try:
        wait_until(lambda: redis_client.get(key) == "ran", timeout_s=30,
                   message="the message ran once the worker caught up with the ODB")
        wait_until(lambda: stream_drained(redis_client, Keys(cluster)), message="the message finished")
    finally:
        redis_client.delete(key)
