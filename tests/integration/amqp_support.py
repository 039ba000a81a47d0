"""Helpers for the AMQP tests: the shared broker on loopback, per-test queues, and
closing only the connections a test names (the broker is shared: never stopped here)."""

from __future__ import annotations

import subprocess
import time

import amqp

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def queue_depth(broker: amqp.Channel, queue: str) -> int:
    return broker.queue_declare(queue, passive=True).message_count


def drain(broker: amqp.Channel, queue: str) -> list[amqp.Message]:
    """Every message in QUEUE now (nothing publishes any more), consumed and gone."""
    expected = queue_depth(broker, queue)
    got: list[amqp.Message] = []
    broker.basic_qos(0, 1000, False)
    tag = broker.basic_consume(queue, callback=got.append, no_ack=True)
    deadline = time.monotonic() + 120
    try:
        while len(got) < expected:
            assert time.monotonic() < deadline, f"{len(got)} of {expected} messages consumed"
            try:
                broker.connection.drain_events(timeout=1)
            except TimeoutError:
                pass
    finally:
        broker.basic_cancel(tag)
    return got


def close_connections(name_part: str) -> int:
    """Close every broker connection whose client-given name contains NAME_PART."""
    done = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                          capture_output=True, text=True, timeout=60, check=True)
    pids = [line.split("\t", 1)[0] for line in done.stdout.splitlines() if name_part in line]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test cut"],
                       capture_output=True, timeout=60)
    return len(pids)
