"""Helpers for the AMQP tests: the shared broker on loopback, per-test queues, closing
only the connections a test names, and the two disturbances a test may bring on the whole
shared broker, kept as short as they can be and always undone: a stop_app/start_app of the
RabbitMQ application (the node keeps running) and a memory alarm."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import amqp

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def connect() -> amqp.Channel:
    """A channel on a connection of the test's own (a broker restart closes it: connect again)."""
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", connect_timeout=5)
    conn.connect()
    return conn.channel()


def rabbitmqctl(*args: str, timeout_s: float = 120) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


@contextmanager
def broker_stopped() -> Iterator[None]:
    """The RabbitMQ application stopped (every connection cut, connects refused) for the
    block's duration, then started again; returns once it accepts connections. Durable
    queues and persistent messages survive it."""
    rabbitmqctl("stop_app")
    try:
        yield
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")


@contextmanager
def publishers_blocked() -> Iterator[None]:
    """A memory alarm for the block's duration: the broker blocks every publishing
    connection (connection.blocked). The watermark in force is read first and put back."""
    current = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    absolute = re.fullmatch(r"\{absolute,\s*(\d+)\}", current)
    restore = ["absolute", absolute.group(1)] if absolute else [current]
    float(restore[-1])  # a value this helper could not put back fails before the alarm
    rabbitmqctl("set_vm_memory_high_watermark", "0")
    try:
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *restore)


def publish(broker: amqp.Channel, queue: str, bodies: list[dict]) -> None:
    """Publish BODIES (persistent JSON) to QUEUE and return once the broker confirmed them
    all: published as a stream on a confirming channel of their own, not one round trip each."""
    channel = broker.connection.channel()
    channel.confirm_select()
    unconfirmed = set(range(1, len(bodies) + 1))  # delivery tags of a fresh channel
    nacked: list[int] = []

    def on_ack(delivery_tag: int, multiple: bool) -> None:
        unconfirmed.difference_update([t for t in unconfirmed if t <= delivery_tag] if multiple
                                      else [delivery_tag])

    channel.events["basic_ack"].add(on_ack)
    channel.events["basic_nack"].add(lambda delivery_tag, multiple: nacked.append(delivery_tag))
    for body in bodies:
        channel.basic_publish(amqp.Message(json.dumps(body), delivery_mode=2,
                                           content_type="application/json"),
                              exchange="", routing_key=queue)
    deadline = time.monotonic() + 120
    while unconfirmed:
        assert not nacked, f"the broker nacked messages to {queue}: {nacked[:10]}"
        assert time.monotonic() < deadline, f"{len(unconfirmed)} of {len(bodies)} messages unconfirmed"
        try:
            broker.connection.drain_events(timeout=1)
        except TimeoutError:
            pass
    channel.close()


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


def connections(name_part: str) -> dict[str, str]:
    """Broker connections whose client-given name contains NAME_PART: connection pid to the
    heartbeat timeout the broker agreed with the client, in seconds."""
    done = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "timeout", "client_properties"],
                          capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("\t", 2) for line in done.stdout.splitlines() if name_part in line]
    return {row[0]: row[1] for row in rows}


def close_connections(name_part: str) -> int:
    """Close every broker connection whose client-given name contains NAME_PART."""
    pids = list(connections(name_part))
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test cut"],
                       capture_output=True, timeout=60)
    return len(pids)
