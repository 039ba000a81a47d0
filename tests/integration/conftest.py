"""Fixtures of the AMQP integration tests: the shared RabbitMQ on loopback and a queue
of the test's own, deleted afterwards (the broker itself is never stopped by a test)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import amqp
import pytest

from tests.integration.amqp_support import connect


@pytest.fixture
def amqp_broker() -> Iterator[amqp.Channel]:
    try:
        channel = connect()
    except Exception as exc:
        pytest.fail(f"RabbitMQ at 127.0.0.1:5672 is not reachable: {exc}")
    yield channel
    try:
        channel.connection.close()
    except (OSError, amqp.exceptions.AMQPError):
        pass  # a test restarted the broker under it: nothing left to close


def delete_queues(broker: amqp.Channel, *queues: str) -> None:
    """Delete QUEUES, on a new connection when a broker restart closed BROKER's."""
    try:
        for queue in queues:
            broker.queue_delete(queue)
    except (OSError, amqp.exceptions.AMQPError):
        fresh = connect()
        for queue in queues:
            fresh.queue_delete(queue)
        fresh.connection.close()


@pytest.fixture
def amqp_queue(amqp_broker: amqp.Channel) -> Iterator[str]:
    name = "esbt-" + uuid.uuid4().hex[:12]
    amqp_broker.queue_declare(name, durable=True, auto_delete=False)
    yield name
    delete_queues(amqp_broker, name, name + ".esb-delay")
