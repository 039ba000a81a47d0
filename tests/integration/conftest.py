"""Fixtures of the AMQP integration tests: the shared RabbitMQ on loopback and a queue
of the test's own, deleted afterwards (the broker itself is never stopped by a test)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import amqp
import pytest


@pytest.fixture
def amqp_broker() -> Iterator[amqp.Channel]:
    try:
        conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", connect_timeout=5)
        conn.connect()
    except Exception as exc:
        pytest.fail(f"RabbitMQ at 127.0.0.1:5672 is not reachable: {exc}")
    channel = conn.channel()
    yield channel
    conn.close()


@pytest.fixture
def amqp_queue(amqp_broker: amqp.Channel) -> Iterator[str]:
    name = "esbt-" + uuid.uuid4().hex[:12]
    amqp_broker.queue_declare(name, durable=True, auto_delete=False)
    yield name
    amqp_broker.queue_delete(name)
