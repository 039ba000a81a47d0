"""Outgoing AMQP throughput against the local RabbitMQ, in one gevent-patched process.

Prints messages per second of: a bare kombu producer with ``confirm_publish`` (each
publish waits for its confirm), a bare kombu producer without confirms, esb's ``send``
(one at a time, confirmed) and ``send_many`` (confirmed, windowed); and the RSS a pool of
10 open connections costs. Each run publishes to its own queue, deleted afterwards.

    .venv/bin/python bench/amqp_bench.py --messages 20000
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402
import kombu  # noqa: E402

from esb.config.definitions import AmqpOutconnDef  # noqa: E402
from esb.outgoing.amqp import AmqpOutconn  # noqa: E402

URL = "amqp://guest:guest@127.0.0.1:5672//"
BODY = {"order": 12345, "amount": "19.99", "currency": "EUR"}


def rss_kb() -> int:
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bare_kombu(queue: str, count: int, confirms: bool) -> float:
    options = {"confirm_publish": True} if confirms else {}
    with kombu.Connection(URL, transport_options=options) as conn:
        producer = conn.Producer(serializer="json")
        started = time.perf_counter()
        for _ in range(count):
            producer.publish(BODY, routing_key=queue, delivery_mode=2)
        return count / (time.perf_counter() - started)


def esb_send(outconn: AmqpOutconn, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        outconn.send(BODY)
    return count / (time.perf_counter() - started)


def esb_send_many(outconn: AmqpOutconn, count: int) -> float:
    started = time.perf_counter()
    assert outconn.send_many(BODY for _ in range(count)) == count
    return count / (time.perf_counter() - started)


def pool_rss_kb(queue: str) -> int:
    outconn = AmqpOutconn(AmqpOutconnDef(name="bench-pool", url=URL, routing_key=queue, pool_size=10))
    before = rss_kb()
    holding = gevent.event.Event()

    def hold() -> None:
        with outconn.connection():
            holding.wait()

    greenlets = [gevent.spawn(hold) for _ in range(10)]
    while outconn.in_use < 10 or len(outconn._links) < 10:
        gevent.sleep(0.05)
    after = rss_kb()
    holding.set()
    gevent.joinall(greenlets)
    outconn.retire()
    return after - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    n = args.messages
    queue = "esb-bench-" + uuid.uuid4().hex[:8]
    with kombu.Connection(URL) as admin:
        channel = admin.channel()
        channel.queue_declare(queue, durable=True, auto_delete=False)
        try:
            outconn = AmqpOutconn(AmqpOutconnDef(name="bench", url=URL, routing_key=queue))
            outconn.send(BODY)  # connect outside the timing
            results = {
                "bare kombu, confirm_publish": bare_kombu(queue, n // 4, True),
                "bare kombu, no confirms": bare_kombu(queue, n, False),
                "esb send (confirmed, one at a time)": esb_send(outconn, n // 4),
                "esb send_many (confirmed, window 1000)": esb_send_many(outconn, n),
            }
            for name, rate in results.items():
                print(f"{name:42s} {rate:10.0f} msg/s")
            confirm = results["bare kombu, confirm_publish"]
            bare = results["bare kombu, no confirms"]
            many = results["esb send_many (confirmed, window 1000)"]
            print(f"send_many / kombu confirm_publish: {many / confirm:.2f} (target >= 3)")
            print(f"send_many / kombu no confirms:     {many / bare:.2f} (target >= 0.7)")
            print(f"RSS of a pool of 10 open connections: {pool_rss_kb(queue) / 1024:.2f} MB (target < 2)")
        finally:
            channel.queue_delete(queue)


if __name__ == "__main__":
    main()
