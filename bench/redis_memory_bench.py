"""Redis memory under a sustained dispatch rate: flat, not growing with the history.

A real esb server takes ``--rate`` invoke_async messages a second (default 1,000) for
``--seconds`` (default 180) after ``--warmup-s`` (default 30); every ``--sample-s``
(default 5) Redis's ``used_memory``, its key count and the dispatch stream's length are
sampled. Usage:

    python bench/redis_memory_bench.py [--rate 1000] [--seconds 180] [--warmup-s 30]
                                       [--sample-s 5] [--workers 2] [--redis URL]

The server runs against a Redis of its own (``redis-server`` on a free port, no
persistence), so that every key and byte counted is the server's; ``--redis URL`` uses
another, whose figures then include whatever else it holds. The load: a service deployed
for the purpose queues ``rate / 10`` messages to a service that does nothing (its runs are
counted from ``esb_dispatch_runs_total`` in ``/metrics``), and this
script asks for it ten times a second through ``POST /esb/invoke`` (up to eight requests
at once, so that a slow answer does not hold up the ticks after it).

Flat means: the last minute's maximum of ``used_memory`` is within ``--memory-slack-mb``
(default 2) of the first minute's maximum, and its key count is no higher; and the
messages sent all ran. The exit status is 1 otherwise, or when the rate was not held
(below 95 % of ``--rate``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

from esb.bus import Keys

ESB = [sys.executable, "-m", "esb.cli"]
TICKS_PER_S = 10

SERVICE = '''
from esb import Service


class BenchFanout(Service):
    """Queues payload["count"] runs of bench.sink."""

    name = "bench.fanout"

    def handle(self):
        for n in range(self.request.payload["count"]):
            self.invoke_async("bench.sink", {"n": n})


class BenchSink(Service):
    """Does nothing: the runs are counted from /metrics, so that the load on Redis is
    the dispatch stream's alone."""

    name = "bench.sink"

    def handle(self):
        pass
'''


@dataclass(frozen=True)
class Sample:
    at_s: float  # since the load started
    used_memory: int
    keys: int
    backlog: int  # entries in the dispatch stream: queued or running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def esb(*args: str) -> None:
    done = subprocess.run([*ESB, *args], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"esb {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def own_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server for this run alone, without persistence."""
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return server, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def admin_session(directory: Path) -> requests.Session:
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(directory / "server.conf")
    session = requests.Session()
    session.auth = (parser["admin"]["username"], parser["admin"]["password"])
    return session


class Load:
    """Asks bench.fanout for RATE / TICKS_PER_S messages every tick, each request on a pool
    of threads so that a slow answer does not hold up the ticks after it."""

    def __init__(self, session: requests.Session, url: str, rate: int, parallel: int = 8):
        self.session, self.url = session, url
        self.per_tick = rate // TICKS_PER_S
        self.sent = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(parallel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)
        self.stopped = time.monotonic()

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(max(0.0, self.started + tick / TICKS_PER_S - time.monotonic())):
            self._pool.submit(self._ask)
            tick += 1

    def _ask(self) -> None:
        try:
            answer = self.session.post(self.url, json={"count": self.per_tick}, timeout=30)
            is_ok = answer.status_code == 200
        except requests.RequestException:
            is_ok = False
        with self._lock:
            if is_ok:
                self.sent += self.per_tick
            else:
                self.failed += 1


def runs(session: requests.Session, base: str) -> int:
    """Dispatched runs of the server so far, ok or not (workers report once a second)."""
    text = session.get(f"{base}/metrics", timeout=10).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("esb_dispatch_runs_total{")))


def sample(client: redis.Redis, keys: Keys, at_s: float, own: bool) -> Sample:
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    pipe.dbsize()
    pipe.xlen(keys.dispatch)
    memory, dbsize, backlog = pipe.execute()
    count = dbsize if own else sum(1 for _ in client.scan_iter(match=f"{keys.prefix}*", count=1000))
    return Sample(at_s, int(memory["used_memory"]), int(count), int(backlog))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="invoke_async messages a second")
    parser.add_argument("--seconds", type=float, default=180.0, help="measured, after the warm-up")
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis", help="a Redis URL to use instead of a redis-server of its own")
    parser.add_argument("--memory-slack-mb", type=float, default=2.0)
    args = parser.parse_args()

    cluster = "bench" + uuid.uuid4().hex[:8]
    keys = Keys(cluster)
    base = Path(tempfile.mkdtemp(prefix="esb-redis-memory-bench-"))
    directory = base / "server"
    redis_server = None
    if args.redis:
        url = args.redis
    else:
        redis_server, url = own_redis(base)
    client = redis.Redis.from_url(url, decode_responses=True)
    samples: list[Sample] = []
    started = False
    try:
        port = free_port()
        esb("quickstart", str(directory), "--port", str(port), "--workers", str(args.workers),
            "--redis", url, "--cluster", cluster)
        (base / "benchmem.py").write_text(SERVICE)
        esb("start", str(directory))
        started = True
        esb("deploy", str(directory), str(base / "benchmem.py"))
        session = admin_session(directory)
        base_url = f"http://127.0.0.1:{port}"
        invoke = f"{base_url}/esb/invoke/bench.fanout"
        deadline = time.monotonic() + 30
        while session.post(invoke, json={"count": 1}, timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("bench.fanout never answered 200")
            time.sleep(0.2)
        load = Load(session, invoke, args.rate)
        total_s = args.warmup_s + args.seconds
        print(f"{args.rate} invoke_async/s for {total_s:g} s ({args.warmup_s:g} s warm-up) on a "
              f"{args.workers}-worker server, Redis {'given' if args.redis else 'of its own'}; "
              f"a sample every {args.sample_s:g} s", flush=True)
        load.start()
        while (at_s := time.monotonic() - load.started) < total_s:
            samples.append(sample(client, keys, at_s, own=not args.redis))
            time.sleep(max(0.0, args.sample_s - (time.monotonic() - load.started - at_s)))
        load.stop()
        sent = load.sent + 1  # and the warm-up's one
        drain_deadline = time.monotonic() + 120
        while (ran := runs(session, base_url)) < sent and time.monotonic() < drain_deadline:
            time.sleep(0.5)
        time.sleep(1)  # the last acknowledgements
        after = sample(client, keys, time.monotonic() - load.started, own=not args.redis)
    finally:
        if started:
            esb("stop", str(directory))
        if redis_server is not None:
            redis_server.kill()
            redis_server.wait(timeout=10)
        else:
            for stale in client.scan_iter(match=f"{keys.prefix}*", count=1000):
                client.delete(stale)
        shutil.rmtree(base, ignore_errors=True)

    measured = [s for s in samples if s.at_s >= args.warmup_s]
    first = [s for s in measured if s.at_s < args.warmup_s + 60]
    last = [s for s in measured if s.at_s >= args.warmup_s + args.seconds - 60]
    rate = load.sent / (load.stopped - load.started)
    mb = 1024 * 1024
    for s in samples:
        print(f"  t={s.at_s:6.1f} s  used_memory {s.used_memory / mb:7.2f} MB  keys {s.keys:6d}  "
              f"stream {s.backlog:5d}" + ("  (warm-up)" if s.at_s < args.warmup_s else ""))
    first_mem, last_mem = max(s.used_memory for s in first), max(s.used_memory for s in last)
    first_keys, last_keys = max(s.keys for s in first), max(s.keys for s in last)
    print(f"rate held: {rate:.0f} messages/s ({load.sent} sent, {load.failed} requests failed); "
          f"ran {ran} of {sent}")
    print(f"used_memory max: first minute {first_mem / mb:.2f} MB, last minute {last_mem / mb:.2f} MB "
          f"({(last_mem - first_mem) / mb:+.2f} MB)")
    print(f"keys max: first minute {first_keys}, last minute {last_keys}; "
          f"stream max {max(s.backlog for s in measured)} entries")
    print(f"after the load: used_memory {after.used_memory / mb:.2f} MB, keys {after.keys}, "
          f"stream {after.backlog} entries")
    misses = []
    if rate < 0.95 * args.rate:
        misses.append(f"rate {rate:.0f} below 95 % of {args.rate}")
    if last_mem - first_mem > args.memory_slack_mb * mb:
        misses.append(f"used_memory grew {(last_mem - first_mem) / mb:.2f} MB")
    if last_keys > first_keys:
        misses.append(f"keys grew from {first_keys} to {last_keys}")
    if ran < sent or load.failed:
        misses.append(f"{sent - ran} messages did not run, {load.failed} requests failed")
    print("flat: every target met" if not misses else "MISSED: " + "; ".join(misses))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
