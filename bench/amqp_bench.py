"""`make bench`, AMQP: esb's outgoing pools and AMQP channels beside bare kombu, in one run.

Publishing, in this gevent-patched process: messages per second of a bare kombu producer
with ``confirm_publish`` (each publish waits for its confirm), a bare kombu producer
without confirms, esb's ``send`` (one at a time, confirmed) and ``send_many`` (confirmed,
windowed), in alternating rounds, medians judged; then the RSS a pool of 10 open
connections costs.

Consuming: two queues each filled with the same MESSAGES messages (py-amqp, no
confirms), then drained one after the other by a bare kombu consumer
(bench/bare_consumer.py, its own gevent-patched process) and by a real esb server (one
worker, a ``[[channel.amqp]]`` with a no-op service), both with one consumer and the
same prefetch, both pinned to the same CPU when there are two or more (as bench/run.py
pins its servers). Both rates are read the same way, from the queue's depth: from the
first reading at most 2 x prefetch below full (the consumer's first burst left out) to
the reading of an empty queue. The consumer's CPU per message over that window is
printed beside: steadier than the rate when other processes share the machine. Rounds
alternate (bare, esb, bare, esb, ...), each on a freshly filled queue; medians are judged.

Targets (issue 11): send_many at least 3 x kombu with confirm_publish and at least 0.7 x
kombu without confirms; a pool of 10 under 2 MB; consuming at least 0.8 x bare kombu.
The exit status is 1 when one is missed. Every queue is its own, deleted at the end.

    .venv/bin/python bench/amqp_bench.py [--messages 20000] [--single 2000] [--prefetch 100]
                                         [--publish-rounds 3] [--consume-rounds 3]
                                         [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import amqp  # noqa: E402
import gevent  # noqa: E402
import kombu  # noqa: E402
from run import EsbSide, children_of, cpu_s, pinned, redis_answers, split_cpus  # noqa: E402 - bench/run.py

from esb.config.definitions import AmqpOutconnDef  # noqa: E402
from esb.outgoing.amqp import AmqpOutconn  # noqa: E402

URL = "amqp://guest:guest@127.0.0.1:5672//"
BODY = {"order": 12345, "amount": "19.99", "currency": "EUR"}
BENCH = Path(__file__).resolve().parent
TARGET_MANY_OVER_CONFIRM = 3.0
TARGET_MANY_OVER_BARE = 0.7
TARGET_POOL_MB = 2.0
TARGET_CONSUME_RATIO = 0.8

NOOP_SERVICE = '''
from esb import Service


class Noop(Service):
    """Does nothing: what the channel around it costs is what is measured."""

    name = "bench.noop"

    def handle(self):
        pass
'''


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


# -- consuming ------------------------------------------------------------------------------


def open_broker() -> amqp.Channel:
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    return conn.channel()


def delete_queues(names: list[str]) -> None:
    """Delete NAMES on a connection of its own: the bench's may have been cut meanwhile
    (other sessions cut the shared broker's connections in their fault tests)."""
    broker = open_broker()
    try:
        for name in names:
            broker.queue_delete(name)
    finally:
        broker.connection.close()


def fill(broker: amqp.Channel, queue: str, count: int) -> None:
    """COUNT persistent JSON messages into QUEUE, fast (no confirms): the backlog to drain."""
    body = json.dumps(BODY)
    for _ in range(count):
        message = amqp.Message(body, delivery_mode=2, content_type="application/json")
        broker.basic_publish(message, exchange="", routing_key=queue)
    while broker.queue_declare(queue, passive=True).message_count < count:
        time.sleep(0.05)


def drain_rate(broker: amqp.Channel, queue: str, count: int, prefetch: int, pid: int) -> tuple[float, float]:
    """(messages/s, CPU µs of PID per message) while a consumer empties QUEUE of its COUNT messages.

    Read from the queue's depth every 10 ms: the window opens at the first reading at most
    2 x PREFETCH below COUNT (the first burst, which only fills the prefetch, left out) and
    closes at the first empty reading."""
    deadline = time.monotonic() + 300
    opened = None
    while time.monotonic() < deadline:
        depth = broker.queue_declare(queue, passive=True).message_count
        now = time.perf_counter()
        if opened is None and depth <= count - 2 * prefetch:
            opened = (now, depth, cpu_s(pid))
        if depth == 0 and opened is not None:
            took = now - opened[0]
            return opened[1] / took, (cpu_s(pid) - opened[2]) / opened[1] * 1e6
        time.sleep(0.01)
    raise SystemExit(f"bench: {queue} not drained within 300 s")


def consume_bare(broker: amqp.Channel, queue: str, count: int, prefetch: int, cpus: set[int] | None) -> tuple:
    script = str(BENCH / "bare_consumer.py")
    consumer = subprocess.Popen(
        [sys.executable, script, "--url", URL, "--queue", queue, "--prefetch", str(prefetch)],
        preexec_fn=pinned(cpus),
    )
    try:
        return drain_rate(broker, queue, count, prefetch, consumer.pid)
    finally:
        consumer.terminate()
        try:
            consumer.wait(10)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait()


def channel_unit(path: Path, queue: str, prefetch: int) -> None:
    """The ``[[channel.amqp]]`` of the esb side, consuming QUEUE into the no-op service."""
    path.write_text(
        f'[[channel.amqp]]\nname = "bench-consume"\nurl = "{URL}"\nqueue = "{queue}"\n'
        f'service = "bench.noop"\nprefetch = {prefetch}\nconsumers_per_worker = 1\n'
    )


def consume_esb(
    server: EsbSide, base: Path, broker: amqp.Channel, queue: str, count: int, prefetch: int
) -> tuple:
    worker = children_of(server.side.arbiter)[0]
    channel_unit(base / "bench_channel.toml", queue, prefetch)
    server.deploy(base / "bench_channel.toml")
    try:
        return drain_rate(broker, queue, count, prefetch, worker)
    finally:
        # Removing the channel stops its consumer before the next round fills the queue.
        (base / "bench_channel.toml").write_text("")
        server.deploy(base / "bench_channel.toml")
        deadline = time.monotonic() + 30
        while broker.queue_declare(queue, passive=True).consumer_count and time.monotonic() < deadline:
            time.sleep(0.1)


def consuming(
    broker: amqp.Channel, count: int, prefetch: int, rounds: int, redis_url: str | None, made: list[str]
) -> dict:
    """Median messages/s and CPU µs per message of each side over ROUNDS alternating rounds.
    The queues it declares are added to MADE, for the caller to delete."""
    cpus, _ = split_cpus(1)
    suffix = uuid.uuid4().hex[:8]
    queues = {"bare": f"esb-bench-bare-{suffix}", "esb": f"esb-bench-esb-{suffix}"}
    made += [*queues.values(), f"{queues['esb']}.esb-delay"]
    base = Path(tempfile.mkdtemp(prefix="esb-amqpbench-"))
    results: dict[str, list[tuple[float, float]]] = {"bare": [], "esb": []}
    server = None
    try:
        for queue in queues.values():
            broker.queue_declare(queue, durable=True, auto_delete=False)
        server = EsbSide(base, 1, redis_url, cpus)
        (base / "bench_noop.py").write_text(NOOP_SERVICE)
        server.deploy(base / "bench_noop.py")
        print(f"consuming {count} messages, prefetch {prefetch}, one consumer a side, "
              f"{'pinned to CPU ' + str(sorted(cpus)) if cpus else 'not pinned (too few CPUs)'}")
        for number in range(1, rounds + 1):
            for side, queue in queues.items():
                fill(broker, queue, count)
                if side == "bare":
                    result = consume_bare(broker, queue, count, prefetch, cpus)
                else:
                    result = consume_esb(server, base, broker, queue, count, prefetch)
                results[side].append(result)
                print(f"  round {number} {side:>4}: {result[0]:8.0f} msg/s, "
                      f"consumer CPU {result[1]:6.1f} µs/msg")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {
        side: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
        for side, rows in results.items()
    }


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000, help="of each bulk row and each drained queue")
    parser.add_argument("--single", type=int, default=2000, help="of the rows that wait for each confirm")
    parser.add_argument("--prefetch", type=int, default=100, help="of both consumers (a channel's default)")
    parser.add_argument("--publish-rounds", type=int, default=3, help="alternating rounds of the publishers")
    parser.add_argument("--consume-rounds", type=int, default=3, help="alternating rounds of each consumer")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis of the esb server")
    args = parser.parse_args()
    n = args.messages
    print(f"esb AMQP bench, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, RabbitMQ at {URL.split('@')[1]}")
    queue = "esb-bench-" + uuid.uuid4().hex[:8]
    made = [queue]
    missed = []
    broker = open_broker()
    try:
        broker.queue_declare(queue, durable=True, auto_delete=False)
        outconn = AmqpOutconn(AmqpOutconnDef(name="bench", url=URL, routing_key=queue))
        outconn.send(BODY)  # connect outside the timing
        rows = {
            "bare kombu, confirm_publish": (args.single, lambda: bare_kombu(queue, args.single, True)),
            "bare kombu, no confirms": (n, lambda: bare_kombu(queue, n, False)),
            "esb send (confirmed, one at a time)": (args.single, lambda: esb_send(outconn, args.single)),
            "esb send_many (confirmed, window 1000)": (n, lambda: esb_send_many(outconn, n)),
        }
        rates: dict[str, list[float]] = {name: [] for name in rows}
        cpu: dict[str, list[float]] = {name: [] for name in rows}
        print(f"publishing: {args.single} messages a one-at-a-time row, {n} a bulk row, "
              f"{args.publish_rounds} rounds alternating; msg/s of each round, median, and the "
              f"median CPU of this process per message")
        for _ in range(args.publish_rounds):
            for name, (count, row) in rows.items():
                used = time.process_time()
                rates[name].append(row())
                cpu[name].append((time.process_time() - used) / count * 1e6)
            broker.queue_purge(queue)
        outconn.retire()
        results = {name: statistics.median(values) for name, values in rates.items()}
        for name, values in rates.items():
            each = "  ".join(f"{rate:6.0f}" for rate in values)
            print(f"  {name:40s} {each}   median {results[name]:6.0f}, "
                  f"{statistics.median(cpu[name]):5.1f} µs CPU/msg")
        pool_mb = pool_rss_kb(queue) / 1024
        redis_url = args.redis if redis_answers(args.redis) else None
        consumed = consuming(broker, n, args.prefetch, args.consume_rounds, redis_url, made)
    finally:
        delete_queues(made)
    confirm = results["bare kombu, confirm_publish"]
    bare = results["bare kombu, no confirms"]
    many = results["esb send_many (confirmed, window 1000)"]
    consume_ratio = consumed["esb"][0] / consumed["bare"][0]
    figures = [
        ("send_many / kombu confirm_publish", many / confirm, f">= {TARGET_MANY_OVER_CONFIRM:g}",
         many / confirm >= TARGET_MANY_OVER_CONFIRM),
        ("send_many / kombu no confirms", many / bare, f">= {TARGET_MANY_OVER_BARE:g}",
         many / bare >= TARGET_MANY_OVER_BARE),
        ("RSS of a pool of 10 connections, MB", pool_mb, f"< {TARGET_POOL_MB:g}", pool_mb < TARGET_POOL_MB),
        ("consuming, esb channel / bare kombu", consume_ratio, f">= {TARGET_CONSUME_RATIO:g}",
         consume_ratio >= TARGET_CONSUME_RATIO),
    ]
    print(f"consuming, bare kombu: {consumed['bare'][0]:8.0f} msg/s, {consumed['bare'][1]:6.1f} µs CPU/msg")
    print(f"consuming, esb:        {consumed['esb'][0]:8.0f} msg/s, {consumed['esb'][1]:6.1f} µs CPU/msg "
          f"(CPU ratio bare / esb {consumed['bare'][1] / consumed['esb'][1]:.2f})")
    for name, value, target, met in figures:
        print(f"{name:38s} {value:6.2f} (target {target}){'' if met else '  MISSED'}")
        if not met:
            missed.append(name)
    print("targets: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
