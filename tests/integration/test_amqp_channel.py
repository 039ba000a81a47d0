"""AMQP channels through real server processes and the real RabbitMQ on loopback.

The test service ``amqpt.record`` counts each message's ``i`` in a Redis hash, so every
effect is visible at least once; duplicates are bounded by what a killed worker held.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest
import redis

from tests.helpers import Server, esb, wait_until
from tests.integration.amqp_support import (
    AMQP_URL,
    broker_stopped,
    close_connections,
    connect,
    drain,
    publish,
    queue_depth,
)
from tests.integration.conftest import delete_queues

DEPLOYABLES = Path(__file__).parent / "deployables"


def deploy_channel(server: Server, tmp_path: Path, *channels: dict[str, Any]) -> None:
    lines = []
    for channel in channels:
        lines += ["[[channel.amqp]]", 'service = "amqpt.record"', f'url = "{AMQP_URL}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in channel.items()]
    unit = tmp_path / "amqpchannels.toml"
    unit.write_text("\n".join(lines) + "\n")
    for path in (DEPLOYABLES / "amqptest.py", unit):
        done = server.deploy(path)
        assert done.returncode == 0, f"esb deploy {path.name}: {done.stdout}\n{done.stderr}"


def consumers(broker: amqp.Channel, queue: str) -> int:
    return broker.queue_declare(queue, passive=True).consumer_count


def counts(client: redis.Redis, queue: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in client.hgetall(f"amqpt:{queue}").items()}


def handlers(client: redis.Redis, queue: str) -> dict[int, list[int]]:
    """Per message, the pid of each worker that handled it, in order of delivery."""
    by: dict[int, list[int]] = {}
    for entry in client.lrange(f"amqpt:{queue}:by", 0, -1):
        i, pid = entry.split()
        by.setdefault(int(i), []).append(int(pid))
    return by


@pytest.fixture
def records(redis_client: redis.Redis, amqp_queue: str) -> Iterator[redis.Redis]:
    """Redis, with what amqpt.record writes for this test's queue deleted afterwards."""
    yield redis_client
    redis_client.delete(f"amqpt:{amqp_queue}", f"amqpt:{amqp_queue}:by")


def channel_row(server: Server, name: str) -> dict:
    return {r["name"]: r for r in server.status()["channels"]["amqp"]}[name]


def test_channel_consumes_survives_kill_9_and_a_connection_cut(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, records: redis.Redis
) -> None:
    """10,000 messages: every effect recorded; the only duplicates are messages the killed
    worker handled and had not acknowledged when it died (at most its prefetch times its
    consumers), each handled again by a live worker; consumers return after a cut."""
    prefetch, per_worker = 20, 2
    server = esb_server(workers=2)
    deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": amqp_queue, "prefetch": prefetch,
                                      "consumers_per_worker": per_worker})
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 2 * per_worker, timeout_s=60,
               message="the consumers of each worker")
    total = 10_000
    publish(amqp_broker, amqp_queue, [{"i": i, "sleep_s": 0.002} for i in range(total)])
    wait_until(lambda: len(counts(records, amqp_queue)) > 1500, timeout_s=60, message="consuming")
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(counts(records, amqp_queue)) == total, timeout_s=300,
               message="every message's effect recorded")
    wait_until(lambda: queue_depth(amqp_broker, amqp_queue) == 0, message="queue empty")
    by = handlers(records, amqp_queue)
    assert set(by) == set(range(total))
    assert any(victim in pids for pids in by.values()), "the killed worker had consumed nothing"
    duplicated = {i: pids for i, pids in by.items() if len(pids) > 1}
    for i, pids in duplicated.items():
        # Delivered to the victim, handled, unacknowledged when it died: back once, to a live worker.
        assert len(pids) == 2 and pids[0] == victim and pids[1] != victim, (i, pids, victim)
    assert len(duplicated) <= prefetch * per_worker, (len(duplicated), duplicated)
    assert counts(records, amqp_queue) == {i: len(pids) for i, pids in by.items()}

    # A connection cut: the consumers come back by themselves and consume again.
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 2 * per_worker, timeout_s=90,
               message="the replacement worker consumes")
    assert close_connections(f"esb channel.amqp c-{amqp_queue} ") >= 1
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 2 * per_worker, timeout_s=60,
               message="consumers back after a cut")
    publish(amqp_broker, amqp_queue, [{"i": total + 1}])
    wait_until(lambda: counts(records, amqp_queue).get(total + 1) == 1, message="consumed after the cut")
    # Status reads the workers' heartbeats, which lag the broker by up to one beat.
    wait_until(lambda: channel_row(server, f"c-{amqp_queue}")["consumers_up"] == 2 * per_worker
               and channel_row(server, f"c-{amqp_queue}")["handled"] >= 1,
               message=f"status shows every consumer back: {channel_row(server, f'c-{amqp_queue}')}")


def test_channel_consumes_again_by_itself_after_a_broker_restart(
    esb_server: Any, tmp_path: Path, amqp_queue: str, records: redis.Redis
) -> None:
    """stop_app/start_app of the shared broker while a channel consumes: its consumers come
    back without a restart of esb, every message is handled, status counts them up again."""
    name = f"c-{amqp_queue}"
    server = esb_server(workers=1)
    deploy_channel(server, tmp_path, {"name": name, "queue": amqp_queue, "consumers_per_worker": 2})
    broker = connect()
    wait_until(lambda: consumers(broker, amqp_queue) == 2, timeout_s=60, message="consumers up")
    publish(broker, amqp_queue, [{"i": i, "sleep_s": 0.01} for i in range(200)])
    wait_until(lambda: len(counts(records, amqp_queue)) >= 20, message="consuming")
    with broker_stopped():
        wait_until(lambda: channel_row(server, name)["consumers_up"] == 0, timeout_s=60,
                   message="status shows the consumers down")
        assert server.status()["healthy"] is False
    broker = connect()
    wait_until(lambda: consumers(broker, amqp_queue) == 2, timeout_s=60,
               message="the channel's consumers back on the queue")
    publish(broker, amqp_queue, [{"i": i} for i in range(200, 400)])
    # At least once: what was unacknowledged when the broker stopped comes again.
    wait_until(lambda: set(counts(records, amqp_queue)) == set(range(400)), timeout_s=120,
               message="every message handled after the restart")
    row = wait_until(lambda: (r := channel_row(server, name))["consumers_up"] == 2 and r["handled"] >= 400
                     and r, message="status shows the consumers up and the messages handled")
    assert row["last_message_at"] is not None and row["failed"] == 0, row
    broker.connection.close()


def test_failing_message_is_delayed_then_dead_lettered_with_its_error(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, records: redis.Redis
) -> None:
    dlx = "esbt-dlx-" + uuid.uuid4().hex[:8]
    dlq = amqp_queue + "-dead"
    amqp_broker.exchange_declare(dlx, "fanout", durable=False, auto_delete=False)
    amqp_broker.queue_declare(dlq, durable=False, auto_delete=False)
    amqp_broker.queue_bind(dlq, dlx)
    try:
        server = esb_server(workers=1)
        deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": amqp_queue, "max_deliveries": 3,
                                          "retry_delay_s": 0.5, "dead_letter_exchange": dlx})
        wait_until(lambda: consumers(amqp_broker, amqp_queue) == 1, timeout_s=60, message="consumer up")
        publish(amqp_broker, amqp_queue, [{"i": 0, "fail": True}] + [{"i": i} for i in range(1, 21)])
        wait_until(lambda: queue_depth(amqp_broker, dlq) == 1, timeout_s=60, message="dead-lettered")
        seen = counts(records, amqp_queue)
        assert seen[0] == 3, seen  # three deliveries, never a hot loop
        assert all(seen[i] == 1 for i in range(1, 21)), seen  # the others kept flowing
        [dead] = drain(amqp_broker, dlq)
        assert json.loads(dead.body) == {"i": 0, "fail": True}
        headers = dead.properties["application_headers"]
        assert headers["x-esb-deliveries"] == 3
        assert "always fails" in headers["x-esb-error"], headers
        row = wait_until(lambda: (r := channel_row(server, f"c-{amqp_queue}"))["dead_lettered"] == 1 and r,
                         message="status counts the dead letter")
        assert (row["handled"], row["failed"], row["consumers_up"]) == (20, 3, 1), row
        assert row["last_message_at"] is not None, row
    finally:
        amqp_broker.queue_delete(dlq)
        amqp_broker.exchange_delete(dlx)


def test_a_message_past_max_deliveries_without_a_dead_letter_exchange_stays_in_its_queue(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, records: redis.Redis
) -> None:
    """With nowhere to dead-letter it, a failing message is kept in its queue, not run again,
    and status names the channel; the messages behind it flow."""
    name = f"c-{amqp_queue}"
    server = esb_server(workers=1)
    deploy_channel(server, tmp_path, {"name": name, "queue": amqp_queue, "max_deliveries": 2,
                                      "retry_delay_s": 0.5})
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 1, timeout_s=60, message="consumer up")
    publish(amqp_broker, amqp_queue, [{"i": 0, "fail": True}] + [{"i": i} for i in range(1, 11)])
    wait_until(lambda: all(counts(records, amqp_queue).get(i) == 1 for i in range(1, 11)), timeout_s=60,
               message="the messages behind it handled")
    wait_until(lambda: any(name in p and "no dead_letter_exchange" in p for p in server.status()["problems"]),
               timeout_s=30, message="status names the channel that keeps the message")
    # Held, then back in its queue: it is never dropped, and never runs past max_deliveries.
    wait_until(lambda: queue_depth(amqp_broker, amqp_queue) + unacknowledged(amqp_queue) == 1, timeout_s=30,
               message="the message kept")
    assert counts(records, amqp_queue)[0] == 2, counts(records, amqp_queue)


def test_status_fails_while_a_channel_has_no_consumer(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    missing = amqp_queue + "-missing"  # never declared: the broker refuses the consumer
    server = esb_server(workers=1)
    deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": missing})
    wait_until(lambda: any("has no consumer" in p for p in server.status()["problems"]), timeout_s=60,
               message="status names the channel without consumer")
    status = server.status()
    assert not status["healthy"]
    row = {r["name"]: r for r in status["channels"]["amqp"]}[f"c-{amqp_queue}"]
    assert row["consumers_up"] == 0, row
    text = esb("status", str(server.directory))
    assert text.returncode != 0, text.stdout
    assert (f"FAIL channel.amqp c-{amqp_queue} ({missing}): 0 consumers, handled 0, failed 0, "
            "dead-lettered 0, last message never") in text.stdout, text.stdout


def test_graceful_stop_finishes_the_messages_it_holds(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, records: redis.Redis
) -> None:
    """After `esb stop`, each message was either run and acknowledged, or is still in the
    queue: none was run and left there to run again."""
    server = esb_server(workers=1)
    deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": amqp_queue, "prefetch": 10})
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 1, timeout_s=60, message="consumer up")
    total = 60
    publish(amqp_broker, amqp_queue, [{"i": i, "sleep_s": 0.3} for i in range(total)])
    wait_until(lambda: len(counts(records, amqp_queue)) >= 3, message="consuming")
    server.stop()
    seen = counts(records, amqp_queue)
    assert set(seen.values()) == {1}, seen
    assert len(seen) + queue_depth(amqp_broker, amqp_queue) == total, (len(seen), total)


def unacknowledged(queue: str) -> int:
    done = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
                          capture_output=True, text=True, timeout=60, check=True)
    rows = dict(line.split("\t") for line in done.stdout.splitlines() if "\t" in line)
    return int(rows[queue])


def test_acks_never_cover_a_message_still_running(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, records: redis.Redis
) -> None:
    """The consumer acknowledges finished messages in bulk (``multiple``): a slow message
    delivered first stays unacknowledged while the later ones are acknowledged, and comes
    back alone when its worker is killed."""
    server = esb_server(workers=1)
    deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": amqp_queue, "prefetch": 20})
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 1, timeout_s=60, message="consumer up")
    total = 60
    publish(amqp_broker, amqp_queue, [{"i": 0, "sleep_s": 8}] + [{"i": i} for i in range(1, total)])
    wait_until(lambda: len(counts(records, amqp_queue)) == total, timeout_s=60, message="all run")
    wait_until(lambda: unacknowledged(amqp_queue) == 1, timeout_s=60, message="only the slow one held")
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    wait_until(lambda: counts(records, amqp_queue)[0] == 2, timeout_s=90,
               message="the slow message delivered again")
    seen = counts(records, amqp_queue)
    assert all(seen[i] == 1 for i in range(1, total)), seen


def delay_queue(queue: str) -> str:
    return f"{queue}.esb-delay"


def dead_letter_exchange(broker: amqp.Channel, exchange: str, queue: str | None) -> None:
    """A fanout exchange, with QUEUE bound to it unless None."""
    broker.exchange_declare(exchange, "fanout", durable=False, auto_delete=False)
    if queue is not None:
        broker.queue_declare(queue, durable=False, auto_delete=False)
        broker.queue_bind(queue, exchange)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_message_that_kills_its_worker_is_dead_lettered_after_max_deliveries(
    esb_server: Any, tmp_path: Path, cluster: str, amqp_broker: amqp.Channel, queue_type: str,
    records: redis.Redis
) -> None:
    """A service that ends its worker (os._exit) never gets to fail: esb counts each
    delivery before the service runs, so the message reaches the dead letters after
    max_deliveries deliveries, costing at most that many workers, and the good messages
    behind it are handled. A quorum queue's own count header does not hide the message."""
    amqp_queue = f"esbt-{uuid.uuid4().hex[:12]}-{queue_type}"
    dlx, dlq = "esbt-dlx-" + uuid.uuid4().hex[:8], amqp_queue + "-dead"
    dead_letter_exchange(amqp_broker, dlx, dlq)
    try:
        server = esb_server(workers=1)
        name = f"c-{amqp_queue}"
        deploy_channel(server, tmp_path, {"name": name, "queue": amqp_queue, "max_deliveries": 3,
                                          "retry_delay_s": 0.5, "dead_letter_exchange": dlx,
                                          "declare": queue_type})
        wait_until(lambda: consumers(amqp_broker, amqp_queue) == 1, timeout_s=60, message="consumer up")
        publish(amqp_broker, amqp_queue, [{"i": 0, "exit": True}] + [{"i": i} for i in range(1, 21)])
        wait_until(lambda: queue_depth(amqp_broker, dlq) == 1, timeout_s=90,
                   message="the poison message dead-lettered")
        deaths = records.zcard(f"esb:{cluster}:worker:deaths")
        assert 1 <= deaths <= 3, deaths
        assert counts(records, amqp_queue)[0] <= 3, counts(records, amqp_queue)
        wait_until(lambda: set(counts(records, amqp_queue)) == set(range(21)), timeout_s=60,
                   message="every good message handled")
        [dead] = drain(amqp_broker, dlq)
        assert json.loads(dead.body) == {"i": 0, "exit": True}
        headers = dead.properties["application_headers"]
        assert headers["x-esb-deliveries"] == 3, headers
        assert "worker" in headers["x-esb-error"] and "died" in headers["x-esb-error"], headers
        wait_until(lambda: queue_depth(amqp_broker, amqp_queue) == 0, message="the queue drained")
        assert records.zcard(f"esb:{cluster}:worker:deaths") == deaths
        row = wait_until(lambda: (r := channel_row(server, name))["dead_lettered"] == 1 and r,
                         message="status counts the dead letter")
        assert row["consumers_up"] == 1, row
    finally:
        records.delete(f"amqpt:{amqp_queue}", f"amqpt:{amqp_queue}:by")
        delete_queues(amqp_broker, amqp_queue, delay_queue(amqp_queue), dlq)
        amqp_broker.exchange_delete(dlx)


def test_a_republish_the_broker_cannot_route_keeps_the_message_and_status_names_the_channel(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, records: redis.Redis
) -> None:
    """Three channels whose failing message cannot be republished as configured: the delay
    queue was deleted (esb declares it again), the dead-letter exchange has no queue bound,
    the dead-letter exchange does not exist. No message is lost: each ends in a queue, and
    until it can, status names the channel and fails."""
    redelay, unbound, missing = (f"{amqp_queue}-{case}" for case in ("redelay", "unbound", "missing"))
    dlx = {case: f"esbt-dlx-{uuid.uuid4().hex[:8]}" for case in (redelay, unbound, missing)}
    dlq = {case: case + "-dead" for case in (redelay, unbound, missing)}
    for queue in (redelay, unbound, missing):
        amqp_broker.queue_declare(queue, durable=True, auto_delete=False)
    dead_letter_exchange(amqp_broker, dlx[redelay], dlq[redelay])
    dead_letter_exchange(amqp_broker, dlx[unbound], None)
    try:
        server = esb_server(workers=1)
        deploy_channel(
            server, tmp_path,
            {"name": f"c-{redelay}", "queue": redelay, "max_deliveries": 2, "retry_delay_s": 0.5,
             "dead_letter_exchange": dlx[redelay]},
            *({"name": f"c-{queue}", "queue": queue, "max_deliveries": 1, "retry_delay_s": 0.5,
               "dead_letter_exchange": dlx[queue]} for queue in (unbound, missing)),
        )
        for queue in (redelay, unbound, missing):
            wait_until(lambda q=queue: consumers(amqp_broker, q) == 1, timeout_s=60,
                       message=f"consumer of {queue}")
        # A dead-letter exchange that does not exist fails status before a message needs it.
        wait_until(lambda: any(f"c-{missing}" in p and dlx[missing] in p
                               for p in server.status()["problems"]), timeout_s=30,
                   message="status names the channel whose dead-letter exchange is missing")
        amqp_broker.queue_delete(delay_queue(redelay))
        for queue in (redelay, unbound, missing):
            publish(amqp_broker, queue, [{"i": 0, "fail": True}])

        # The delay queue is declared again: the message comes back and is dead-lettered.
        wait_until(lambda: queue_depth(amqp_broker, dlq[redelay]) == 1, timeout_s=30,
                   message="the message of the deleted delay queue dead-lettered after its retry")
        assert counts(records, redelay) == {0: 2}
        row = channel_row(server, f"c-{redelay}")
        assert delay_queue(redelay) in (row["last_error"] or ""), row

        # The dead-letter exchanges cannot take the copy: the message is kept, status fails.
        def problems() -> list[str]:
            return [p for p in server.status()["problems"] if f"c-{unbound}" in p or f"c-{missing}" in p]

        wait_until(lambda: len(problems()) == 2, timeout_s=30,
                   message="status names both channels whose dead-letter exchange fails")
        text = esb("status", str(server.directory))
        assert text.returncode != 0, text.stdout
        for queue in (unbound, missing):
            assert f"channel.amqp c-{queue}" in text.stdout, text.stdout
            assert channel_row(server, f"c-{queue}")["dead_lettered"] == 0
        assert dlx[missing] in "".join(problems()) and dlx[unbound] in "".join(problems()), problems()

        # Once the exchanges route, the kept messages arrive and status is healthy again.
        dead_letter_exchange(amqp_broker, dlx[unbound], dlq[unbound])
        dead_letter_exchange(amqp_broker, dlx[missing], dlq[missing])
        for queue in (unbound, missing):
            wait_until(lambda q=queue: queue_depth(amqp_broker, dlq[q]) == 1, timeout_s=30,
                       message=f"the kept message of {queue} dead-lettered")
            [dead] = drain(amqp_broker, dlq[queue])
            assert json.loads(dead.body) == {"i": 0, "fail": True}
            assert "always fails" in dead.properties["application_headers"]["x-esb-error"]
            assert counts(records, queue) == {0: 1}
        wait_until(lambda: not problems(), timeout_s=30, message="status clears both problems")
        assert all(queue_depth(amqp_broker, q) == 0 for q in (redelay, unbound, missing))
    finally:
        for case in (redelay, unbound, missing):
            amqp_broker.exchange_delete(dlx[case])
            records.delete(f"amqpt:{case}", f"amqpt:{case}:by")
        delete_queues(amqp_broker, *(q for case in (redelay, unbound, missing)
                                     for q in (case, delay_queue(case), dlq[case])))
