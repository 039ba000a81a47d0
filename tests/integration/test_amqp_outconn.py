"""Outgoing AMQP through real server processes and the real RabbitMQ on loopback.

Every test declares its own queue (and names its own outconn, so the broker's connection
list tells its connections apart) and deletes it at teardown. Connections are cut with
``rabbitmqctl close_connection`` on this test's connections only: the broker is shared.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import amqp
import pytest

from tests.helpers import Server, esb, free_port, wait_until
from tests.integration.amqp_support import (
    AMQP_URL,
    broker_stopped,
    close_connections,
    connect,
    connections,
    drain,
    publishers_blocked,
    queue_depth,
)

DEPLOYABLES = Path(__file__).parent / "deployables"


def deploy(server: Server, tmp_path: Path, *outconns: dict[str, Any]) -> None:
    """The test services, two HTTP channels and an [[outconn.amqp]] for each of OUTCONNS."""
    def toml(value: Any) -> str:
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + " }"
        return json.dumps(value)

    lines = []
    for outconn in outconns:
        lines += ["[[outconn.amqp]]", *(f"{key} = {toml(value)}" for key, value in outconn.items())]
    lines += [
        "",
        "[[channel.http]]",
        'name = "amqpt-send"',
        'path = "/amqpt/send"',
        'service = "amqpt.send"',
        "",
        "[[channel.http]]",
        'name = "amqpt-send-many"',
        'path = "/amqpt/send_many"',
        'service = "amqpt.send_many"',
    ]
    unit = tmp_path / "amqptest.toml"
    unit.write_text("\n".join(lines) + "\n")
    for path in (DEPLOYABLES / "amqptest.py", unit):
        done = server.deploy(path)
        assert done.returncode == 0, f"esb deploy {path.name}: {done.stdout}\n{done.stderr}"
    wait_until(
        lambda: server.post("/amqpt/send", {"outconn": "?", "body": 1}).status_code == 500,
        message="amqp test channels deployed",
    )


def bodies_of(messages: list[amqp.Message]) -> Counter:
    return Counter((b["batch"], b["i"]) for b in (json.loads(m.body) for m in messages))


def test_send_sets_properties_message_id_and_cid_and_mandatory_unroutable_fails(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    server = esb_server(workers=1)
    deploy(server, tmp_path, {
        "name": f"o-{amqp_queue}", "url": AMQP_URL, "routing_key": amqp_queue, "mandatory": True,
        "app_id": "esb-test", "priority": 3, "headers": {"x-from": "conf"},
    })
    response = server.post("/amqpt/send", {"outconn": f"o-{amqp_queue}", "body": {"k": 1},
                                           "headers": {"x-call": "yes"}},
                           headers={"X-ESB-CID": "cid-amqp-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["cid"] == "cid-amqp-1"
    message = amqp_broker.basic_get(amqp_queue, no_ack=True)
    assert message is not None
    assert json.loads(message.body) == {"k": 1}
    props = message.properties
    assert props["message_id"] == answer["message_id"]
    assert props["correlation_id"] == "cid-amqp-1"
    assert props["content_type"] == "application/json"
    assert props["delivery_mode"] == 2
    assert props["app_id"] == "esb-test"
    assert props["priority"] == 3
    assert props["application_headers"] == {"x-from": "conf", "x-call": "yes"}

    unroutable = server.post("/amqpt/send", {"outconn": f"o-{amqp_queue}", "body": "lost",
                                             "routing_key": "nowhere-" + amqp_queue}).json()
    assert unroutable["error"] == "Unroutable", unroutable
    assert queue_depth(amqp_broker, amqp_queue) == 0
    wait_until(lambda: {r["name"]: r for r in server.status()["outconns"]["amqp"]}
               .get(f"o-{amqp_queue}", {}).get("returns") == 1, message="status shows the return")
    row = outconn_row(server, f"o-{amqp_queue}")
    assert row["sent"] == 2 and row["confirmed"] == 1 and row["reachable"] is True, row
    assert "guest:**@" in row["url"] and ":guest@" not in row["url"], row

    # A queue that refuses what overflows it: the broker nacks the second message.
    full = amqp_queue + "-full"
    amqp_broker.queue_declare(full, durable=False, auto_delete=False,
                              arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    try:
        assert "message_id" in server.post("/amqpt/send", {"outconn": f"o-{amqp_queue}", "body": "one",
                                                           "routing_key": full}).json()
        nacked = server.post("/amqpt/send", {"outconn": f"o-{amqp_queue}", "body": "two",
                                             "routing_key": full}).json()
        assert nacked["error"] == "PublishNacked", nacked
        assert queue_depth(amqp_broker, full) == 1
    finally:
        amqp_broker.queue_delete(full)
    row = wait_until(lambda: (r := outconn_row(server, f"o-{amqp_queue}"))["nacks"] == 1 and r,
                     message="status counts the nack")
    assert (row["pool_size"], row["in_use"], row["open"], row["confirms_pending"]) == (10, 0, 1, 0), row
    assert (row["sent"], row["confirmed"], row["returns"], row["errors"]) == (4, 2, 1, 0), row
    assert row["last_error"] is None and row["blocked"] is False, row
    text = esb("status", str(server.directory)).stdout
    assert (f"ok   outconn.amqp o-{amqp_queue} amqp://guest:**@127.0.0.1:5672//: pool 10 a worker, "
            "in use 0 of 1 open, sent 4, pending 0, nacks 1, returns 1, errors 0\n") in text, text

    def metric_line() -> str | None:
        text = server.session.get(server.url("/metrics"), headers=server.admin_headers(), timeout=10).text
        labels = f'kind="outconn.amqp",name="o-{amqp_queue}",outcome="returned"'
        wanted = f"esb_amqp_messages_total{{{labels}}} 1.0"
        return wanted if wanted in text else None

    wait_until(metric_line, message="/metrics counts the returned message")


def test_pool_of_two_under_twenty_concurrent_requests(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    server = esb_server(workers=1)
    deploy(server, tmp_path, {"name": f"o-{amqp_queue}", "url": AMQP_URL, "routing_key": amqp_queue,
                              "pool_size": 2, "acquire_timeout_s": 0.2})

    def request(batch: int) -> Any:
        return server.post("/amqpt/send_many", {"outconn": f"o-{amqp_queue}", "batch": batch, "count": 3000})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(request, range(20)))  # each has its 30 s timeout: none hangs
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, [(r.status_code, r.text) for r in responses]
    assert statuses[503] >= 1 and statuses[200] >= 2, statuses
    for r in responses:
        if r.status_code == 503:
            assert "busy" in r.json()["error"], r.text
        else:
            assert r.json() == {"confirmed": 3000}, r.text
    assert queue_depth(amqp_broker, amqp_queue) == 3000 * statuses[200]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_send_many_in_batches_every_message_exactly_once(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    """The issue's 100,000 messages, 100 requests of 1,000 through an HTTP channel: each in
    the queue once, and the worker's RSS grows by less than 30 MB (measured after the first
    batch, which loads what any first send loads)."""
    batches, per_batch = 100, 1000
    server = esb_server(workers=1)
    deploy(server, tmp_path, {"name": f"o-{amqp_queue}", "url": AMQP_URL, "routing_key": amqp_queue})
    worker = server.worker_pids()[0]
    first = server.post("/amqpt/send_many", {"outconn": f"o-{amqp_queue}", "batch": 0, "count": per_batch})
    assert first.json() == {"confirmed": per_batch}, first.text
    rss_before = rss_kb(worker)
    for batch in range(1, batches):
        response = server.post("/amqpt/send_many",
                               {"outconn": f"o-{amqp_queue}", "batch": batch, "count": per_batch})
        assert response.json() == {"confirmed": per_batch}, response.text
    grown_mb = (rss_kb(worker) - rss_before) / 1024
    seen = bodies_of(drain(amqp_broker, amqp_queue))
    assert len(seen) == batches * per_batch and set(seen.values()) == {1}
    assert grown_mb < 30, grown_mb


def cut(outconn: str) -> int:
    return close_connections(f"outconn.amqp {outconn} ")


def more_than(answers: dict, count: int) -> Any:
    return lambda: len(answers) > count


def failed_batches(answers: dict[int, dict]) -> int:
    return sum(1 for answer in answers.values() if answer.get("error"))


@pytest.mark.parametrize("disruption", ["close_connection", "stop_app"])
def test_connections_cut_during_bulk_send(
    esb_server: Any, tmp_path: Path, amqp_queue: str, disruption: str
) -> None:
    """What a service was told was confirmed is in the queue once; what it was told was not
    confirmed is there at most once; never-sent messages are absent; the pool recovers.

    The cuts: ``close_connection`` of this test's connections, three times; or one
    ``stop_app``/``start_app`` of the whole broker (the queue is durable, the messages
    persistent), kept only until a batch in flight has failed."""
    outconn = f"o-{amqp_queue}"
    server = esb_server(workers=1)
    deploy(server, tmp_path, {"name": outconn, "url": AMQP_URL, "routing_key": amqp_queue, "pool_size": 4,
                              "window": 200})
    answers: dict[int, dict] = {}
    done = threading.Event()

    def sender(first: int) -> None:
        batch = first
        while not done.is_set():
            response = server.post("/amqpt/send_many", {"outconn": outconn, "batch": batch, "count": 500})
            answers[batch] = {"status": response.status_code, **response.json()}
            batch += 4

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(answers) >= 4, timeout_s=60, message="first batches sent")
        if disruption == "stop_app":
            failed_before = failed_batches(answers)
            with broker_stopped():
                wait_until(lambda: failed_batches(answers) > failed_before, timeout_s=60,
                           message="a batch in flight failed")
            wait_until(more_than(answers, len(answers) + 3), timeout_s=90,
                       message="batches after the restart")
        else:
            cuts = 0
            for _ in range(3):
                cuts += cut(outconn)
                wait_until(more_than(answers, len(answers) + 3), timeout_s=60, message="batches after a cut")
            assert cuts >= 1
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failed_batches(answers), "no batch was cut: the test proved nothing"
    broker = connect()  # the fixture's connection did not outlive a broker restart
    seen = bodies_of(drain(broker, amqp_queue))
    for batch, answer in answers.items():
        assert answer["status"] in (200, 503), answer
        if answer["status"] == 503:  # nothing published: the pool could not connect in time
            assert not any(seen[(batch, i)] for i in range(500)), answer
            continue
        unconfirmed = {index for index, _mid in answer.get("unconfirmed", [])}
        unsent_from = answer.get("unsent_from")
        for i in range(500):
            if unsent_from is not None and i >= unsent_from:
                assert seen[(batch, i)] == 0, (batch, i, answer)
            elif i in unconfirmed:
                assert seen[(batch, i)] <= 1, (batch, i, answer)
            else:
                assert seen[(batch, i)] == 1, (batch, i, answer)
    again = server.post("/amqpt/send_many", {"outconn": outconn, "batch": 10_000, "count": 100})
    assert again.json() == {"confirmed": 100}, again.text
    assert queue_depth(broker, amqp_queue) == 100
    broker.connection.close()


def outconn_row(server: Server, name: str) -> dict:
    return {r["name"]: r for r in server.status()["outconns"]["amqp"]}[name]


def test_send_fails_blocked_after_blocked_timeout_and_works_once_the_alarm_clears(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    """A memory alarm blocks publishers: the send fails with PublishersBlocked after
    ``blocked_timeout_s`` (not after the confirm timeout, and not once the alarm clears),
    status shows the outconn blocked until the broker takes messages again."""
    outconn = f"o-{amqp_queue}"
    server = esb_server(workers=1)
    deploy(server, tmp_path, {"name": outconn, "url": AMQP_URL, "routing_key": amqp_queue,
                              "blocked_timeout_s": 1, "confirm_timeout_s": 120})

    def send(n: int) -> dict:
        return server.post("/amqpt/send", {"outconn": outconn, "body": {"n": n}}).json()

    assert "message_id" in send(1)
    with publishers_blocked():  # the whole broker's: for one send only
        blocked = send(2)
    assert blocked["error"] == "PublishersBlocked", blocked
    assert "blocked publishers for 1 s" in blocked["message"], blocked
    row = wait_until(lambda: (r := outconn_row(server, outconn))["blocked"] and r,
                     message="status shows the outconn blocked")
    assert row["last_error"] == "publishers blocked" and row["errors"] == 1, row
    text = esb("status", str(server.directory)).stdout
    assert f"outconn.amqp {outconn}" in text and "BLOCKED" in text, text
    sent = send(3)
    assert "message_id" in sent, sent
    wait_until(lambda: outconn_row(server, outconn)["blocked"] is False,
               message="status shows the outconn unblocked")
    seen = Counter(json.loads(m.body)["n"] for m in drain(amqp_broker, amqp_queue))
    assert seen[1] == 1 and seen[3] == 1 and seen[2] <= 1, seen


def test_redeploy_keeps_an_unchanged_pool_and_retires_a_changed_one(amqp_queue: str) -> None:
    """In-process, against the real broker: what a worker does with its table on reload."""
    from esb.config.definitions import AmqpOutconnDef
    from esb.errors import OutconnError
    from esb.outgoing.amqp import refresh

    same = AmqpOutconnDef(name="same", url=AMQP_URL, routing_key=amqp_queue)
    old = AmqpOutconnDef(name="changed", url=AMQP_URL, routing_key=amqp_queue)
    table = refresh({}, {"same": same, "changed": old})
    for outconn in table.values():
        outconn.send({"before": True})
    kept, retired = table["same"], table["changed"]
    table = refresh(table, {"same": same, "changed": AmqpOutconnDef(name="changed", url=AMQP_URL,
                                                                      routing_key=amqp_queue, pool_size=3)})
    assert table["same"] is kept and kept.facts()["open"] == 1
    assert table["changed"] is not retired and retired.facts()["open"] == 0
    with pytest.raises(OutconnError):
        retired.send({"after": True})
    table["changed"].send({"after": True})
    table = refresh(table, {})
    assert table == {} and kept.facts()["open"] == 0


def test_a_connection_closed_by_the_broker_is_replaced_on_checkout(
    amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    """In-process: the broker closes the pooled connection while it is idle; the next send
    finds it dead when taking it out, opens another and is confirmed."""
    from esb.config.definitions import AmqpOutconnDef
    from esb.outgoing.amqp import AmqpOutconn

    outconn = AmqpOutconn(AmqpOutconnDef(name=f"cut-{amqp_queue}", url=AMQP_URL, routing_key=amqp_queue))
    try:
        outconn.send({"n": 1})
        assert close_connections(f"outconn.amqp cut-{amqp_queue} ") == 1
        outconn.send({"n": 2})
        assert queue_depth(amqp_broker, amqp_queue) == 2
        assert outconn.facts()["open"] == 1
    finally:
        outconn.retire()


def test_an_idle_pooled_connection_keeps_its_heartbeats_going(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    """With heartbeat_s = 2 the broker drops a connection that is silent for two beats; a
    pooled connection left idle for six stays the same connection, and sends on it."""
    outconn = f"o-{amqp_queue}"
    server = esb_server(workers=1)
    deploy(server, tmp_path, {"name": outconn, "url": AMQP_URL, "routing_key": amqp_queue,
                              "pool_size": 1, "heartbeat_s": 2})
    assert "message_id" in server.post("/amqpt/send", {"outconn": outconn, "body": {"n": 1}}).json()
    before = connections(f"outconn.amqp {outconn} ")
    assert list(before.values()) == ["2"], before  # one connection, 2 s heartbeats agreed
    time.sleep(12)
    assert connections(f"outconn.amqp {outconn} ") == before
    assert "message_id" in server.post("/amqpt/send", {"outconn": outconn, "body": {"n": 2}}).json()
    assert connections(f"outconn.amqp {outconn} ") == before
    assert queue_depth(amqp_broker, amqp_queue) == 2


def test_a_refused_or_unreachable_outconn_fails_at_once_as_an_amqp_error_and_fails_status(
    esb_server: Any, tmp_path: Path, amqp_queue: str
) -> None:
    """Bad credentials fail the send at once (retrying cannot help), a broker that does not
    answer fails it once after the retry budget; both are AMQP errors in the log, and
    status fails naming each outconn. confirms = false with mandatory = true is refused."""
    refused, down = f"o-{amqp_queue}-refused", f"o-{amqp_queue}-down"
    server = esb_server(workers=1)
    deploy(server, tmp_path,
           {"name": refused, "url": "amqp://guest:not-the-password@127.0.0.1:5672//", "retry_budget_s": 5},
           {"name": down, "url": f"amqp://guest:guest@127.0.0.1:{free_port()}//", "retry_budget_s": 1})
    answer = server.post("/amqpt/send", {"outconn": refused, "body": {"n": 1}}).json()
    assert answer["error"] == "AmqpAccessRefused", answer
    assert "ACCESS_REFUSED" in answer["message"] and "not-the-password" not in answer["message"], answer
    answer = server.post("/amqpt/send", {"outconn": down, "body": {"n": 1}}).json()
    assert answer["error"] == "AmqpUnreachable", answer
    assert answer["message"].count(f"outconn {down}") == 1, answer  # not wrapped in a second one

    def named() -> list[str]:
        return [p for p in server.status()["problems"] if refused in p or down in p]

    wait_until(lambda: len(named()) == 2, message="status names both outconns")
    assert "ACCESS_REFUSED" in " ".join(named()), named()
    assert esb("status", str(server.directory)).returncode != 0
    log = server.log()
    assert f"AMQP broker unreachable: outconn.amqp {down}" in log, server.log_tail()
    assert "Redis unreachable: outconn.amqp" not in log, server.log_tail()

    unit = tmp_path / "unconfirmed.toml"
    unit.write_text(f'[[outconn.amqp]]\nname = "u-{amqp_queue}"\nurl = "{AMQP_URL}"\n'
                    "confirms = false\nmandatory = true\n")
    done = server.deploy(unit)
    assert done.returncode != 0, done.stdout
    assert "outconn.amqp[0].mandatory" in done.stdout + done.stderr, done.stdout + done.stderr
