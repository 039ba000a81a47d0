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
from pathlib import Path
from typing import Any

import amqp
import redis

from tests.helpers import Server, esb, wait_until
from tests.integration.amqp_support import AMQP_URL, close_connections, drain, queue_depth

DEPLOYABLES = Path(__file__).parent / "deployables"


def deploy_channel(server: Server, tmp_path: Path, channel: dict[str, Any]) -> None:
    lines = ["[[channel.amqp]]", 'service = "amqpt.record"', f'url = "{AMQP_URL}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in channel.items()]
    unit = tmp_path / "amqpchannels.toml"
    unit.write_text("\n".join(lines) + "\n")
    for path in (DEPLOYABLES / "amqptest.py", unit):
        done = server.deploy(path)
        assert done.returncode == 0, f"esb deploy {path.name}: {done.stdout}\n{done.stderr}"


def publish(broker: amqp.Channel, queue: str, bodies: list[dict]) -> None:
    broker.confirm_select()
    for body in bodies:
        broker.basic_publish_confirm(amqp.Message(json.dumps(body), delivery_mode=2,
                                                  content_type="application/json"),
                                     exchange="", routing_key=queue)


def consumers(broker: amqp.Channel, queue: str) -> int:
    return broker.queue_declare(queue, passive=True).consumer_count


def counts(client: redis.Redis, queue: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in client.hgetall(f"amqpt:{queue}").items()}


def test_channel_consumes_survives_kill_9_and_a_connection_cut(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, redis_client: redis.Redis
) -> None:
    """2,000 messages (10,000 in the issue; fewer on the shared test machine): every effect
    recorded, duplicates only what the killed worker held; consumers return after a cut."""
    server = esb_server(workers=2)
    deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": amqp_queue, "prefetch": 20})
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 2, timeout_s=60, message="a consumer per worker")
    total = 2000
    publish(amqp_broker, amqp_queue, [{"i": i, "sleep_s": 0.002} for i in range(total)])
    wait_until(lambda: len(counts(redis_client, amqp_queue)) > 300, timeout_s=60, message="consuming")
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(counts(redis_client, amqp_queue)) == total, timeout_s=180,
               message="every message's effect recorded")
    seen = counts(redis_client, amqp_queue)
    duplicates = sum(n - 1 for n in seen.values())
    # At most what the killed worker held unacknowledged (prefetch) came again.
    assert duplicates <= 20, duplicates
    wait_until(lambda: queue_depth(amqp_broker, amqp_queue) == 0, message="queue empty")

    # A connection cut: the consumers come back by themselves and consume again.
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 2, timeout_s=90,
               message="the replacement worker consumes")
    assert close_connections(f"esb channel.amqp c-{amqp_queue} ") >= 1
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 2, timeout_s=60,
               message="consumers back after a cut")
    publish(amqp_broker, amqp_queue, [{"i": total + 1}])
    wait_until(lambda: counts(redis_client, amqp_queue).get(total + 1) == 1, message="consumed after the cut")

    def channel_row() -> dict:
        return {r["name"]: r for r in server.status()["channels"]["amqp"]}[f"c-{amqp_queue}"]

    # Status reads the workers' heartbeats, which lag the broker by up to one beat.
    wait_until(lambda: channel_row()["consumers_up"] == 2 and channel_row()["handled"] >= 1,
               message=f"status shows both consumers back: {channel_row()}")
    amqp_broker.queue_delete(amqp_queue + ".esb-delay")


def test_failing_message_is_delayed_then_dead_lettered_with_its_error(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, redis_client: redis.Redis
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
        seen = counts(redis_client, amqp_queue)
        assert seen[0] == 3, seen  # three deliveries, never a hot loop
        assert all(seen[i] == 1 for i in range(1, 21)), seen  # the others kept flowing
        [dead] = drain(amqp_broker, dlq)
        assert json.loads(dead.body) == {"i": 0, "fail": True}
        headers = dead.properties["application_headers"]
        assert headers["x-esb-deliveries"] == 3
        assert "always fails" in headers["x-esb-error"], headers
        wait_until(lambda: {r["name"]: r for r in server.status()["channels"]["amqp"]}[f"c-{amqp_queue}"]
                   ["dead_lettered"] == 1, message="status counts the dead letter")
    finally:
        amqp_broker.queue_delete(dlq)
        amqp_broker.queue_delete(amqp_queue + ".esb-delay")
        amqp_broker.exchange_delete(dlx)


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
    assert f"FAIL channel.amqp c-{amqp_queue}" in text.stdout, text.stdout


def test_graceful_stop_finishes_the_messages_it_holds(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, redis_client: redis.Redis
) -> None:
    """After `esb stop`, each message was either run and acknowledged, or is still in the
    queue: none was run and left there to run again."""
    server = esb_server(workers=1)
    deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": amqp_queue, "prefetch": 10})
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 1, timeout_s=60, message="consumer up")
    total = 60
    publish(amqp_broker, amqp_queue, [{"i": i, "sleep_s": 0.3} for i in range(total)])
    wait_until(lambda: len(counts(redis_client, amqp_queue)) >= 3, message="consuming")
    server.stop()
    seen = counts(redis_client, amqp_queue)
    assert set(seen.values()) == {1}, seen
    assert len(seen) + queue_depth(amqp_broker, amqp_queue) == total, (len(seen), total)
    amqp_broker.queue_delete(amqp_queue + ".esb-delay")


def unacknowledged(queue: str) -> int:
    done = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
                          capture_output=True, text=True, timeout=60, check=True)
    rows = dict(line.split("\t") for line in done.stdout.splitlines() if "\t" in line)
    return int(rows[queue])


def test_acks_never_cover_a_message_still_running(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str, redis_client: redis.Redis
) -> None:
    """The consumer acknowledges finished messages in bulk (``multiple``): a slow message
    delivered first stays unacknowledged while the later ones are acknowledged, and comes
    back alone when its worker is killed."""
    server = esb_server(workers=1)
    deploy_channel(server, tmp_path, {"name": f"c-{amqp_queue}", "queue": amqp_queue, "prefetch": 20})
    wait_until(lambda: consumers(amqp_broker, amqp_queue) == 1, timeout_s=60, message="consumer up")
    total = 60
    publish(amqp_broker, amqp_queue, [{"i": 0, "sleep_s": 8}] + [{"i": i} for i in range(1, total)])
    wait_until(lambda: len(counts(redis_client, amqp_queue)) == total, timeout_s=60, message="all run")
    wait_until(lambda: unacknowledged(amqp_queue) == 1, timeout_s=60, message="only the slow one held")
    os.kill(server.worker_pids()[0], signal.SIGKILL)
    wait_until(lambda: counts(redis_client, amqp_queue)[0] == 2, timeout_s=90,
               message="the slow message delivered again")
    seen = counts(redis_client, amqp_queue)
    assert all(seen[i] == 1 for i in range(1, total)), seen
    amqp_broker.queue_delete(amqp_queue + ".esb-delay")
