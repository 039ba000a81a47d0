"""Outgoing SQL connections and SQL notifications through real server processes, against
PostgreSQL (a schema of the test's own, dropped afterwards) and SQLite (a file in tmp_path).

The deployed service ``sqlnote.collect`` (deployables/sqlnote.py) appends every row it
receives, with the run and the worker's pid, to the Redis list ``sqlnote:<notification>``;
a ``Feed`` (a notification, its table and what arrived) is the tests' handle on both ends.
The fault tests prove that any row that came twice was cut between its service call and
the watermark's commit (``assert_repeats_are_cut_batches``), not merely that repeats are few.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from esb.config import load_server_config
from esb.notification.store import NotificationStore
from tests.conftest import set_conf
from tests.helpers import PrivateRedis, Server, esb, free_port, wait_until

DEPLOYABLES = Path(__file__).parent / "deployables"


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a database of the test's own: a PostgreSQL schema or an SQLite file."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'data.db'}"


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def unit_text(outconns: list[dict], notes: list[dict], channels: bool = True) -> str:
    lines = []
    for outconn in outconns:
        lines += ["[[outconn.sql]]", *(f"{k} = {toml_value(v)}" for k, v in outconn.items()), ""]
    for note in notes:
        body = {"service": "sqlnote.collect", "interval_s": 1, **note}
        lines += ["[[notification.sql]]",
                  *(f"{k} = {toml_value(v)}" for k, v in body.items() if v is not None), ""]
    if channels:
        lines += ["[[channel.http]]", 'name = "sqlnote-query"', 'path = "/sqlnote/query"',
                  'service = "sqlnote.query"', ""]
    return "\n".join(lines)


def deploy(server: Server, tmp_path: Path, text_: str, *, with_module: bool = True) -> None:
    unit = tmp_path / "sqlnotes.toml"
    unit.write_text(text_)
    paths = [DEPLOYABLES / "sqlnote.py", unit] if with_module else [unit]
    for path in paths:
        done = server.deploy(path)
        assert done.returncode == 0, f"esb deploy {path.name}: {done.stdout}\n{done.stderr}"


def wait_query_channel(server: Server) -> None:
    """Until sqlnote.query answers through outconn "db" (the deploy reached the worker)."""
    wait_until(lambda: server.post("/sqlnote/query", {"outconn": "db", "sql": "SELECT 1 AS one"}).status_code
               == 200, 30, message="query channel deployed")


def note_status(server: Server, name: str) -> dict:
    return next(n for n in server.status()["notifications"] if n["name"] == name)


@pytest.fixture
def sql_keys(redis_client: redis.Redis) -> Iterator[list[str]]:
    """Notification names a test uses; their sqlnote:* keys are deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        for key in redis_client.scan_iter(match=f"sqlnote:{name}*"):
            redis_client.delete(key)


def new_name(sql_keys: list[str], prefix: str = "n") -> str:
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    sql_keys.append(name)
    return name


INTERVAL_S = 1  # of the fault tests' notifications: polling must resume within 2 intervals + 5 s


@dataclass
class Feed:
    """One notification under test: its database, its table ``t_<name>`` (id, updated_at,
    body, done), and what its service received (deployables/sqlnote.py's Redis list)."""

    url: str
    engine: Engine
    name: str
    redis: redis.Redis
    tmp_path: Path

    @property
    def table(self) -> str:
        return f"t_{self.name}"

    def insert(self, ids: range, updated_at: dt.datetime, body: str = "x") -> None:
        """BODY "ids": each row's body is "row <id>"."""
        with self.engine.begin() as conn:
            rows = [{"id": i, "u": updated_at, "b": body if body != "ids" else f"row {i}"} for i in ids]
            conn.execute(text(f"INSERT INTO {self.table} (id, updated_at, body) VALUES (:id, :u, :b)"), rows)

    def delivered(self, name: str | None = None) -> list[dict]:
        """Every delivery of a row, in order: {"row", "run_id", "mode", "pid"}."""
        return [json.loads(item) for item in self.redis.lrange(f"sqlnote:{name or self.name}", 0, -1)]

    def counts(self) -> Counter:
        """How often each row id was delivered."""
        return Counter(item["row"]["id"] for item in self.delivered())

    def definition(self, **changes: Any) -> dict:
        """The [[notification.sql]] of this feed, with CHANGES (a None value drops a key)."""
        return {"name": self.name, "outconn": "db", "query": f"SELECT id, updated_at, body FROM {self.table}",
                "watermark": ["updated_at", "id"], **changes}

    def deploy(self, server: Server, notes: list[dict] | None = None, *, outconn: dict | None = None,
               with_module: bool = True) -> None:
        """Deploy outconn "db" on this feed's database and NOTES (default: this feed's)."""
        notes = [self.definition()] if notes is None else notes
        deploy(server, self.tmp_path, unit_text([{"name": "db", "url": self.url, **(outconn or {})}], notes),
               with_module=with_module)

    def status(self, server: Server) -> dict:
        return note_status(server, self.name)

    def wait_resumed(self, other_than: int | None = None, timeout_s: float = 0) -> None:
        """Until a run that started from now on (a run id not seen so far) delivers, from a
        worker other than OTHER_THAN: polling resumed. By default within two intervals
        plus 5 s (the notifications of the fault tests run every INTERVAL_S)."""
        before = self.delivered()
        seen = {item["run_id"] for item in before}

        def resumed() -> bool:
            return any(item["run_id"] not in seen and item["pid"] != other_than
                       for item in self.delivered()[len(before):])

        wait_until(resumed, timeout_s or 2 * INTERVAL_S + 5, message="polling resumed")


@pytest.fixture
def feeds(tmp_path: Path, redis_client: redis.Redis, sql_keys: list[str]) -> Iterator[Callable[..., Feed]]:
    """Factory: ``feeds(url, **engine_options)`` makes a Feed with a fresh table."""
    made: list[Feed] = []

    def make(url: str, **options: Any) -> Feed:
        feed = Feed(url, create_engine(url, **options), new_name(sql_keys), redis_client, tmp_path)
        with feed.engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {feed.table} (id INTEGER PRIMARY KEY, updated_at TIMESTAMP "
                              "NOT NULL, body VARCHAR(100), done INTEGER DEFAULT 0)"))
        made.append(feed)
        return feed

    yield make
    for feed in made:
        feed.engine.dispose()


@pytest.fixture
def feed(feeds: Callable[..., Feed], db_url: str) -> Feed:
    """A Feed on PostgreSQL, then on SQLite."""
    return feeds(db_url)


@pytest.fixture
def pg_feed(feeds: Callable[..., Feed], pg_url: str) -> Feed:
    """A Feed on PostgreSQL only."""
    return feeds(pg_url)


# -- delivery ------------------------------------------------------------------------------


def test_watermark_delivers_rows_sharing_a_timestamp_exactly_once(esb_server: Any, feed: Feed) -> None:
    same = dt.datetime(2030, 1, 1, 12, 0, 0)
    feed.insert(range(1, 501), same, body="ids")
    server = esb_server(workers=2)
    feed.deploy(server, [feed.definition(max_rows=100, batch_size=30)])
    name = feed.name
    wait_until(lambda: len(feed.delivered()) >= 500, 60, message="500 rows delivered")
    # Rows inserted later, with a later timestamp, come too.
    feed.insert(range(501, 521), same + dt.timedelta(seconds=1), body="ids")
    wait_until(lambda: len(feed.delivered()) >= 520, 30, message="20 more rows delivered")
    runs = feed.status(server)["runs"]
    wait_until(lambda: feed.status(server)["runs"] >= runs + 2, 30, message="two further runs")
    items = feed.delivered()
    ids = feed.counts()
    assert sorted(ids) == list(range(1, 521))
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    first = items[0]
    assert first["mode"] == "watermark"
    assert first["row"]["body"] == f"row {first['row']['id']}"
    assert isinstance(first["row"]["updated_at"], str)  # JSON-able: ISO text
    status = feed.status(server)
    assert status["rows"] == 520
    assert status["last_outcome"] == "ok"
    assert status["consecutive_failures"] == 0
    assert status["stale"] is False and status["active"] is True
    assert status["watermark"][1] == 520
    assert status["last_pid"] in server.worker_pids()
    assert status["next_run"]
    series = f'esb_notification_rows_total{{notification="{name}"}} 520.0'

    def scrape() -> str:
        return server.session.get(server.url("/metrics"), headers=server.admin_headers(), timeout=10).text

    wait_until(lambda: series in scrape(), 10, message="rows in /metrics")
    text_ = scrape()
    assert f'esb_notification_runs_total{{notification="{name}",outcome="ok"}}' in text_
    assert f'esb_notification_last_success_timestamp_seconds{{notification="{name}"}}' in text_


def test_plain_mode_with_after_success_marks_rows(esb_server: Any, feed: Feed) -> None:
    feed.insert(range(1, 51), dt.datetime(2030, 1, 1), body="ids")
    server = esb_server(workers=1)
    table = feed.table
    feed.deploy(server, [feed.definition(
        query=f"SELECT id, body FROM {table} WHERE done = 0 ORDER BY id", watermark=None,
        batch_size=20, max_rows=20, after_success=f"UPDATE {table} SET done = 1 WHERE id IN :ids")],
        outconn={"statement_timeout_s": 5})
    wait_until(lambda: len(feed.delivered()) >= 50, 60, message="50 rows delivered")
    with feed.engine.connect() as conn:
        wait_until(lambda: conn.execute(text(f"SELECT count(*) FROM {table} WHERE done = 0")).scalar() == 0,
                   10, message="every row marked")
    assert sorted(feed.counts()) == list(range(1, 51))
    assert {item["mode"] for item in feed.delivered()} == {"plain"}


# -- failures ------------------------------------------------------------------------------


def test_query_errors_show_the_databases_message_while_a_healthy_one_delivers(
    esb_server: Any, feed: Feed, sql_keys: list[str]
) -> None:
    syntax, missing = new_name(sql_keys, "s"), new_name(sql_keys, "m")
    server = esb_server(workers=1)
    feed.deploy(server, [
        feed.definition(watermark=["id"]),
        {"name": syntax, "outconn": "db", "query": "SELEC id FROM nowhere", "watermark": ["id"]},
        {"name": missing, "outconn": "db", "query": "SELECT id FROM no_such_table_here"},
    ])
    feed.insert(range(1, 11), dt.datetime(2030, 1, 1))
    wait_until(lambda: len(feed.delivered()) >= 10, 30, message="healthy notification delivers")

    def failing(name: str) -> dict | None:
        row = note_status(server, name)
        return row if row["consecutive_failures"] >= 2 else None

    syntax_row = wait_until(lambda: failing(syntax), 30, message="syntax error seen twice")
    missing_row = wait_until(lambda: failing(missing), 30, message="missing table seen twice")
    assert "syntax error" in syntax_row["last_error"].lower()
    assert "no_such_table_here" in missing_row["last_error"]
    assert syntax_row["last_outcome"] == "failed"
    feed.insert(range(11, 21), dt.datetime(2030, 1, 2))
    wait_until(lambda: len(feed.delivered()) >= 20, 30, message="still delivering")
    done = esb("status", str(server.directory))
    assert done.returncode != 0
    assert f"notification {syntax} is failing" in done.stdout + done.stderr
    # The failure is logged once per change of state, not once per run.
    log = server.log()
    assert log.count(f"notification {syntax}") <= 3, log[-3000:]


def test_a_failing_batch_is_retried_then_dead_lettered_and_later_rows_flow(
    esb_server: Any, feed: Feed, redis_client: redis.Redis
) -> None:
    name = feed.name
    base = dt.datetime(2030, 1, 1)
    feed.insert(range(1, 6), base)
    feed.insert(range(6, 7), base + dt.timedelta(seconds=1), body="poison")
    server = esb_server(workers=1)
    feed.deploy(server, [feed.definition(batch_size=5, max_attempts=3)])
    wait_until(lambda: len(feed.delivered()) >= 5, 30, message="first batch")
    # The poisoned batch fails, the watermark stays before it until its third attempt,
    # which dead-letters it; later rows then flow.
    def attempts() -> int:
        return int(redis_client.get(f"sqlnote:{name}:poisoned") or 0)

    moved_early: list[tuple[int, int]] = []

    def watermark_held_until_the_third_attempt() -> bool:
        watermark = feed.status(server)["watermark"][1]
        seen = attempts()  # read after the watermark: fewer than 3 now were fewer then
        if seen < 3 and watermark != 5:
            moved_early.append((seen, watermark))
        return seen >= 3

    wait_until(lambda: attempts() >= 1, 30, message="poison seen")
    wait_until(watermark_held_until_the_third_attempt, 30, message="three attempts")
    assert not moved_early, moved_early
    wait_until(lambda: feed.status(server)["watermark"][1] == 6, 30, message="moved past the batch")
    feed.insert(range(7, 12), base + dt.timedelta(seconds=2))
    wait_until(lambda: len(feed.delivered()) >= 10, 60, message="rows after the poison")
    assert int(redis_client.get(f"sqlnote:{name}:poisoned")) == 3
    assert sorted(feed.counts()) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    done = esb("notifications", str(server.directory), "--failed", "--json")
    assert done.returncode == 0, done.stderr
    dead = [d for d in json.loads(done.stdout) if d["name"] == name]
    assert len(dead) == 1
    assert dead[0]["attempts"] == 3
    assert [r["id"] for r in dead[0]["rows"]] == [6]
    assert "poisoned" in dead[0]["error"]
    wait_until(lambda: feed.status(server)["consecutive_failures"] == 0, 30, message="recovered")


# -- processes -----------------------------------------------------------------------------

class Writer:
    """Inserts 10 rows every 50 ms, stamped with the time, until stopped (at most 2000)."""

    def __init__(self, feed: Feed):
        self.feed = feed
        self.inserted: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        i = 0
        while not self._stop.is_set() and i < 2000:
            self.feed.insert(range(i + 1, i + 11), dt.datetime.now(dt.UTC).replace(tzinfo=None))
            self.inserted.extend(range(i + 1, i + 11))
            i += 10
            time.sleep(0.05)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_all_delivered(self) -> None:
        expected = set(self.inserted)
        wait_until(lambda: set(self.feed.counts()) >= expected, 60, message="every inserted row delivered")


@dataclass
class Runs:
    """The ODB's records of a notification's runs (written by each run that got to its end)."""

    server: Server
    name: str

    def __post_init__(self) -> None:
        self.store = NotificationStore(create_engine(load_server_config(self.server.directory).odb_url))

    def by_id(self) -> dict[str, dict]:
        return {r["run_id"]: r for r in self.store.runs(self.name, limit=1000)}

    def watermark(self) -> list | None:
        return self.store.state(self.name).watermark

    def close(self) -> None:
        self.store.engine.dispose()


def started(run: dict) -> float:
    moment = dt.datetime.fromisoformat(run["started_at"])
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def cut_call(feed: Feed, signum: int) -> int:
    """Send SIGNUM to the worker while its service call has delivered a batch and not
    returned (deployables/sqlnote.py holds the call): between the call and the watermark's
    commit. Answers the worker's pid."""
    hold = f"sqlnote:{feed.name}:hold_s"
    feed.redis.set(hold, 3)
    try:
        pid = int(wait_until(lambda: feed.redis.get(f"sqlnote:{feed.name}:holding"), 30,
                             message="a service call holding"))
        os.kill(pid, signum)
    finally:
        feed.redis.delete(hold)
    return pid


def watermark_key(values: list) -> tuple:
    """(updated_at, id) as ordered: a watermark's values (stored or shown) or a row's."""
    moment = values[0] if isinstance(values[0], dt.datetime) else dt.datetime.fromisoformat(values[0])
    return moment, values[1]


def assert_repeats_are_cut_batches(feed: Feed, runs: Runs, cut_pids: set[int]) -> set[int]:
    """Every repeat of a row is of the one allowed kind: the kill (or stop) fell between its
    service call and the watermark's commit. Proven per delivery that came again: it was
    made by a worker the test cut, in the last service call of its run (so the run went no
    further), by a run that never ended well (no "ok" record: killed, or superseded once it
    went on), and the next delivery came from another run whose watermark at its start did
    not cover the row. Answers the pids whose deliveries came again."""
    records = runs.by_id()
    deliveries: dict[int, list[dict]] = {}
    last_call: dict[str, str] = {}
    for item in feed.delivered():
        deliveries.setdefault(item["row"]["id"], []).append(item)
        last_call[item["run_id"]] = item["call"]
    repeated_by: set[int] = set()
    for row_id, items in deliveries.items():
        for earlier, later in itertools.pairwise(items):
            why = f"row {row_id}: {earlier} then {later}; runs {records.get(earlier['run_id'])}"
            assert earlier["pid"] in cut_pids, "repeated, first delivered by a worker not cut: " + why
            assert earlier["call"] == last_call[earlier["run_id"]], "the run went on past it: " + why
            assert records.get(earlier["run_id"], {}).get("outcome") in (None, "superseded"), why
            assert later["run_id"] != earlier["run_id"], why
            bound = records.get(later["run_id"], {}).get("watermark")
            if bound is not None:
                row = later["row"]
                assert watermark_key(bound) < watermark_key([row["updated_at"], row["id"]]), why
            repeated_by.add(earlier["pid"])
    return repeated_by


def test_kill_9_of_the_running_worker_twice_loses_no_row_and_repeats_only_cut_batches(
    esb_server: Any, feed: Feed
) -> None:
    server = esb_server(workers=2)
    feed.deploy(server, [feed.definition(batch_size=10, interval_s=INTERVAL_S)])
    runs = Runs(server, feed.name)
    killed: set[int] = set()
    try:
        with Writer(feed) as writer:
            for _ in range(2):
                wait_until(lambda: len(feed.delivered()) >= 20, 30, message="rows flowing")
                victim = cut_call(feed, signal.SIGKILL)
                killed.add(victim)
                feed.wait_resumed(other_than=victim)
        writer.wait_all_delivered()
        # Each kill fell inside a call that had delivered its batch: that batch came again.
        assert assert_repeats_are_cut_batches(feed, runs, killed) == killed
    finally:
        runs.close()


def test_kill_9_of_the_scheduler_twice_polling_resumes_and_no_row_is_lost(
    esb_server: Any, feed: Feed
) -> None:
    server = esb_server(workers=1)
    feed.deploy(server, [feed.definition(interval_s=INTERVAL_S)])
    with Writer(feed) as writer:
        for _ in range(2):
            wait_until(lambda: len(feed.delivered()) >= 20, 30, message="rows flowing")
            scheduler = server.status()["scheduler"]
            assert scheduler["active"]
            os.kill(scheduler["pid"], signal.SIGKILL)
            feed.wait_resumed()
            wait_until(lambda old=scheduler["pid"]: (s := server.status()["scheduler"])["active"]
                       and s["pid"] != old, 60, message="a new scheduler active")
    writer.wait_all_delivered()
    # No worker died: nothing may come twice.
    assert max(feed.counts().values()) == 1


def test_a_stopped_worker_neither_stalls_polling_nor_breaks_the_guarantees_when_it_goes_on(
    esb_server: Any, feed: Feed
) -> None:
    """SIGSTOP of the worker in the middle of a call, shorter than the arbiter's timeout:
    another worker takes the firing over; after SIGCONT the late run commits nothing and
    calls nothing more (it is superseded), no row is lost, the watermark never moves
    backwards and the runs that ended well never overlapped."""
    server = esb_server(workers=2, timeout=60)
    feed.deploy(server, [feed.definition(batch_size=10, interval_s=INTERVAL_S)])
    runs = Runs(server, feed.name)
    watermarks: list[tuple] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            try:
                value = runs.watermark()
                if value is not None:
                    watermarks.append(watermark_key(value))
            except Exception as exc:  # noqa: BLE001 - shown by the assertion below
                watermarks.append(("error", repr(exc)))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    victim = None
    try:
        with Writer(feed) as writer:
            wait_until(lambda: len(feed.delivered()) >= 20, 30, message="rows flowing")
            victim = cut_call(feed, signal.SIGSTOP)
            held_run = feed.delivered()[-1]["run_id"]
            feed.wait_resumed(other_than=victim)
            flowing = len(feed.delivered())
            wait_until(lambda: len(feed.delivered()) >= flowing + 50, 30, message="rows flow without it")
            mark = len(feed.delivered())
            os.kill(victim, signal.SIGCONT)
            victim = None
            record = wait_until(lambda: runs.by_id().get(held_run), 30, message="the late run's record")
            assert record["outcome"] == "superseded", record
            time.sleep(2)  # polling goes on beside the worker that went on
        writer.wait_all_delivered()
        late = [item for item in feed.delivered()[mark:] if item["run_id"] == held_run]
        assert not late, "the superseded run called its service again"
        assert assert_repeats_are_cut_batches(feed, runs, {record["pid"]}) == {record["pid"]}
        assert record["pid"] in server.worker_pids()  # it only went on, nothing killed it
        assert len(watermarks) > 50 and all(w[0] != "error" for w in watermarks), watermarks[-3:]
        assert watermarks == sorted(watermarks), "the watermark moved backwards"
        ended_well = sorted((started(r), started(r) + r["duration_s"]) for r in runs.by_id().values()
                            if r["outcome"] == "ok")
        for (_, end), (start, _) in itertools.pairwise(ended_well):
            assert start >= end - 0.01, "two runs at once"
    finally:
        watching.set()
        if victim is not None:
            os.kill(victim, signal.SIGCONT)
        watcher.join(timeout=10)
        runs.close()


def test_a_redis_restart_while_a_notification_polls_loses_no_row(
    esb_server: Any, feed: Feed, private_redis: PrivateRedis
) -> None:
    """The server's Redis (a private one, append-only so the service's own list survives)
    is killed and started again: polling resumes by itself and every row arrives."""
    private_redis.start(persistent=True)
    server = esb_server(start=False)
    set_conf(server.directory, "redis", "url", private_redis.url)
    server.start()
    feed.redis = redis.Redis.from_url(private_redis.url, decode_responses=True)
    feed.deploy(server, [feed.definition(batch_size=10, interval_s=INTERVAL_S)])
    try:
        with Writer(feed) as writer:
            wait_until(lambda: len(feed.delivered()) >= 20, 30, message="rows flowing")
            private_redis.kill()
            time.sleep(2)  # polling meets a Redis that is not there
            private_redis.start(persistent=True)
            feed.wait_resumed(timeout_s=60)
            flowing = len(feed.delivered())
            wait_until(lambda: len(feed.delivered()) >= flowing + 50, 30, message="rows flow again")
        writer.wait_all_delivered()
    finally:
        feed.redis.close()


def test_two_servers_sharing_odb_and_redis_deliver_each_row_once(
    esb_server: Any, pg_feed: Feed, pg_url: str
) -> None:
    feed = pg_feed
    first = esb_server(odb=pg_url, workers=1, name="one")
    second = esb_server(odb=pg_url, workers=1, name="two")
    feed.deploy(first, [feed.definition(batch_size=7)])
    for step in range(10):
        feed.insert(range(step * 30 + 1, step * 30 + 31), dt.datetime(2030, 1, 1, 0, step))
        time.sleep(0.3)
    wait_until(lambda: len(feed.delivered()) >= 300, 60, message="300 rows delivered")
    runs = feed.status(first)["runs"]
    wait_until(lambda: feed.status(first)["runs"] >= runs + 2, 30, message="two further runs")
    counts = feed.counts()
    assert sorted(counts) == list(range(1, 301))
    assert max(counts.values()) == 1
    assert second.answers()


# -- outgoing connections ------------------------------------------------------------------


def test_outconn_connect_and_session_and_a_slow_query_does_not_block_the_worker(
    esb_server: Any, tmp_path: Path, pg_url: str
) -> None:
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text([{"name": "db", "url": pg_url, "pool_size": 2}], []))
    wait_query_channel(server)
    answer = server.post("/sqlnote/query", {"outconn": "db", "sql": "SELECT :x AS x", "params": {"x": 7},
                                            "session": True})
    assert answer.json() == {"rows": [{"x": "7"}]}
    slow: dict[str, Any] = {}

    def slow_query() -> None:
        slow["response"] = server.post("/sqlnote/query", {"outconn": "db", "sql": "SELECT pg_sleep(3) AS s"})

    thread = threading.Thread(target=slow_query)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)  # the slow query is under way in the worker's only process
    pings = 0
    while thread.is_alive() and time.monotonic() - started < 2.5:
        assert requests.get(server.url("/esb/ping"), timeout=2).status_code == 200
        pings += 1
    thread.join(timeout=30)
    assert slow["response"].status_code == 200, slow["response"].text
    assert pings >= 1


# -- operating -----------------------------------------------------------------------------


def test_pause_resume_run_and_hot_deploys_that_pause_change_and_remove(
    esb_server: Any, feeds: Callable[..., Feed], redis_client: redis.Redis, cluster: str, tmp_path: Path
) -> None:
    feed = feeds(f"sqlite:///{tmp_path / 'ops.db'}")
    name = feed.name
    server = esb_server(workers=1)
    definition = feed.definition(watermark=["id"])
    feed.deploy(server, [definition])
    day = dt.datetime(2030, 1, 1)
    feed.insert(range(1, 6), day)
    wait_until(lambda: len(feed.delivered()) == 5, 30, message="first rows")
    directory = str(server.directory)

    def job_runs() -> int:
        return int(redis_client.hget(f"esb:{cluster}:job:esb.notification:{name}", "runs") or 0)

    # The operator's pause: firings end at once, nothing is delivered.
    assert esb("notifications", directory, "pause", name).returncode == 0
    wait_until(lambda: feed.status(server)["paused"], 10, message="paused in status")
    feed.insert(range(6, 11), day)
    runs = job_runs()
    wait_until(lambda: job_runs() >= runs + 2, 30, message="two firings while paused")
    assert len(feed.delivered()) == 5
    assert esb("notifications", directory, "resume", name).returncode == 0
    wait_until(lambda: len(feed.delivered()) == 10, 30, message="rows after resume")
    done = esb("notifications", directory, "run", name)
    assert done.returncode == 0, done.stderr
    listing = esb("notifications", directory)
    assert name in listing.stdout and "watermark" in listing.stdout
    # A hot deploy that pauses: the scheduler no longer fires it.
    feed.deploy(server, [definition | {"is_active": False}], with_module=False)
    wait_until(lambda: not feed.status(server)["active"] and not feed.status(server)["next_run"],
               30, message="deactivated by deploy")
    assert esb("status", directory).returncode == 0  # a paused notification is not a problem
    feed.insert(range(11, 16), day)
    feed.insert(range(16, 18), day, body="skip")
    # A hot deploy that changes the query (and activates it again), going on from the
    # stored watermark by choice.
    changed = definition | {"query": f"SELECT id, updated_at, body FROM {feed.table} WHERE body <> 'skip'",
                            "on_change": "keep"}
    feed.deploy(server, [changed], with_module=False)
    wait_until(lambda: len(feed.delivered()) == 15, 30, message="rows of the changed query")
    assert sorted(feed.counts()) == list(range(1, 16))
    # A hot deploy that removes it.
    feed.deploy(server, [], with_module=False)
    wait_until(lambda: all(n["name"] != name for n in server.status()["notifications"]), 30,
               message="removed from status")
    assert esb("notifications", directory, "run", name).returncode != 0


class PrivatePostgres:
    """A PostgreSQL of one test's own (initdb, pg_ctl) on a free port, so the test may stop
    it; never the shared one. Run as the postgres user when the tests run as root."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: that is private to the user running the tests.
        self.home = Path(tempfile.mkdtemp(prefix="esb-pg-"))
        os.chmod(self.home, 0o755)
        self.directory = self.home / "pgdata"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]}: {done.stdout}\n{done.stderr}"

    def init(self) -> None:
        self.directory.mkdir()
        if self.as_user:
            shutil.chown(self.directory, "postgres")
        self._run("initdb", "-D", str(self.directory), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.directory), "-o", options, "-w", "-l",
                  str(self.directory / "log"), "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory), "-m", "immediate", "-w", "stop")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.fail("initdb and pg_ctl are needed for the database outage test")
    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        except AssertionError:
            pass  # already stopped
        shutil.rmtree(server.home, ignore_errors=True)


def test_a_database_outage_shows_in_status_and_recovers_without_losing_rows(
    esb_server: Any, feeds: Callable[..., Feed], private_pg: PrivatePostgres
) -> None:
    feed = feeds(private_pg.url, pool_pre_ping=True)
    name = feed.name
    server = esb_server(workers=1)
    feed.deploy(server, outconn={"pool_timeout_s": 2, "connect_args": {"connect_timeout": 2}})
    feed.insert(range(1, 11), dt.datetime(2030, 1, 1))
    wait_until(lambda: len(feed.delivered()) == 10, 30, message="rows before the outage")
    private_pg.stop()
    row = wait_until(lambda: (r := feed.status(server))["consecutive_failures"] >= 2 and r, 60,
                     message="failures in status")
    assert row["last_error"] and row["last_outcome"] == "failed"
    done = esb("status", str(server.directory))
    assert done.returncode != 0 and f"notification {name} is failing" in done.stdout + done.stderr
    private_pg.start()
    feed.insert(range(11, 21), dt.datetime(2030, 1, 2))
    wait_until(lambda: len(feed.delivered()) >= 20, 60, message="rows after the outage")
    wait_until(lambda: feed.status(server)["consecutive_failures"] == 0, 30, message="recovered")
    assert sorted(feed.counts()) == list(range(1, 21))
    wait_until(lambda: esb("status", str(server.directory)).returncode == 0, 30, message="status healthy")
    log = server.log()
    assert log.count(f"database unreachable: notification {name}") <= 2, log[-3000:]
    assert f"database works again: notification {name}" in log


def test_status_shows_each_outgoing_sql_connection_with_a_masked_url(
    esb_server: Any, tmp_path: Path, pg_url: str
) -> None:
    server = esb_server(workers=1)
    url = pg_url.replace("postgresql+psycopg://", "postgresql+psycopg://postgres:s3cret@")
    deploy(server, tmp_path, unit_text([{"name": "db", "url": url}], []))
    wait_query_channel(server)

    def outconn() -> dict | None:
        rows = server.status()["outconns"]["sql"]
        return rows[0] if rows and rows[0]["reachable"] is not None else None

    row = wait_until(outconn, 30, message="outconn.sql pinged")
    assert row["name"] == "db" and row["reachable"] is True and row["pool_size"] == 5
    assert "s3cret" not in json.dumps(server.status()) and "postgres:**@" in row["url"]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_200000_row_backlog_drains_without_the_worker_growing(
    esb_server: Any, pg_feed: Feed, redis_client: redis.Redis
) -> None:
    feed, name = pg_feed, pg_feed.name
    with feed.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {feed.table} (id, updated_at, body) SELECT g, TIMESTAMP '2030-01-01' "
                          "+ (g / 1000) * INTERVAL '1 second', repeat('x', 80) "
                          "FROM generate_series(1, 200000) g"))
    server = esb_server(workers=1)
    feed.deploy(server, [])
    wait_query_channel(server)
    (worker,) = server.worker_pids()
    before = rss_kb(worker)
    feed.deploy(server, [feed.definition(max_rows=1000, batch_size=1000, service="sqlnote.count")],
                with_module=False)
    peak = before
    deadline = time.monotonic() + 300
    while int(redis_client.get(f"sqlnote:{name}:count") or 0) < 200000:
        assert time.monotonic() < deadline, "backlog not drained within 300 s"
        peak = max(peak, rss_kb(worker))
        time.sleep(0.2)
    peak = max(peak, rss_kb(worker))
    assert server.worker_pids() == [worker]
    assert int(redis_client.get(f"sqlnote:{name}:count")) == 200000
    assert peak - before < 30 * 1024, f"worker RSS grew by {(peak - before) / 1024:.1f} MB"


# -- watermarks never skip a row silently -------------------------------------------------

T0 = dt.datetime(2030, 1, 1)


def allow_nulls(feed: Feed) -> None:
    """The feed's table again, with ``updated_at`` nullable."""
    with feed.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {feed.table}"))
        conn.execute(text(f"CREATE TABLE {feed.table} (id INTEGER PRIMARY KEY, updated_at TIMESTAMP, "
                          "body VARCHAR(100), done INTEGER DEFAULT 0)"))


def insert_nulls(feed: Feed, ids: list[int]) -> None:
    with feed.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {feed.table} (id, updated_at, body) VALUES (:id, NULL, 'x')"),
                     [{"id": i} for i in ids])


def try_deploy(server: Server, tmp_path: Path, url: str, notes: list[dict]) -> Any:
    """``esb deploy`` of outconn "db" on URL and NOTES; the finished process, whatever it says."""
    unit = tmp_path / "sqlnotes.toml"
    unit.write_text(unit_text([{"name": "db", "url": url}], notes))
    return server.deploy(unit)


def failing_with(server: Server, name: str, *words: str) -> Callable[[], dict | None]:
    def check() -> dict | None:
        row = note_status(server, name)
        error = row["last_error"] or ""
        return row if row["consecutive_failures"] > 0 and all(w in error for w in words) else None

    return check


def test_null_watermark_values_at_a_batch_end_and_inside_are_named_in_status_then_delivered_once(
    esb_server: Any, feed: Feed
) -> None:
    """A NULL sorts last on PostgreSQL (the first batch ends with it) and first on SQLite
    (inside the batch); either way the other rows flow, the run fails naming the column
    and the rows, the stored watermark holds no NULL, and once the rows have a value each
    row has come exactly once."""
    allow_nulls(feed)
    feed.insert(range(1, 5), T0)
    insert_nulls(feed, [5])
    server = esb_server(workers=1)
    feed.deploy(server, [feed.definition(batch_size=5)])
    wait_until(lambda: set(feed.counts()) >= {1, 2, 3, 4}, 30, message="the first rows")
    feed.insert(range(6, 9), T0 + dt.timedelta(seconds=1))
    insert_nulls(feed, [9])
    wait_until(lambda: set(feed.counts()) >= set(range(1, 9)) - {5}, 30,
               message="the rows after a NULL delivered")
    row = wait_until(failing_with(server, feed.name, "updated_at", "NULL", "2 rows", "id=5", "id=9"), 30,
                     message="status naming the NULL rows")
    assert row["last_outcome"] == "failed"
    assert None not in (row["watermark"] or []), row["watermark"]
    done = esb("status", str(server.directory))
    assert done.returncode != 0
    assert f"notification {feed.name} is failing" in done.stdout and "id=9" in done.stdout
    with feed.engine.begin() as conn:
        conn.execute(text(f"UPDATE {feed.table} SET updated_at = :u WHERE updated_at IS NULL"),
                     {"u": T0 + dt.timedelta(seconds=2)})
    wait_until(lambda: set(feed.counts()) == set(range(1, 10)), 30, message="the fixed rows delivered")
    wait_until(lambda: feed.status(server)["consecutive_failures"] == 0, 30, message="recovered")
    wait_until(lambda: esb("status", str(server.directory)).returncode == 0, 30, message="status healthy")
    counts = feed.counts()
    assert max(counts.values()) == 1, counts


def test_equal_watermark_values_across_a_batch_boundary_skip_no_row(
    esb_server: Any, pg_feed: Feed, sql_keys: list[str]
) -> None:
    """watermark = ["updated_at"] alone, 25 rows sharing one value, batches of 10: the group
    comes whole (at most max_rows); a group larger than max_rows fails the run naming the
    value and delivers nothing of it rather than a part."""
    feed = pg_feed
    feed.insert(range(1, 26), T0, body="ids")
    feed.insert(range(26, 31), T0 + dt.timedelta(seconds=1), body="ids")
    big = new_name(sql_keys, "g")
    server = esb_server(workers=1)
    feed.deploy(server, [feed.definition(watermark=["updated_at"], batch_size=10, max_rows=100),
                         feed.definition(name=big, watermark=["updated_at"], batch_size=10, max_rows=20)])
    wait_until(lambda: len(feed.delivered()) >= 30, 30, message="30 rows delivered")
    runs = feed.status(server)["runs"]
    wait_until(lambda: feed.status(server)["runs"] >= runs + 2, 30, message="two further runs")
    counts = feed.counts()
    assert sorted(counts) == list(range(1, 31)) and max(counts.values()) == 1, counts
    row = wait_until(failing_with(server, big, "updated_at", "2030-01-01T00:00:00", "max_rows"), 30,
                     message="the oversized group named")
    assert feed.delivered(big) == []
    done = esb("status", str(server.directory))
    assert done.returncode != 0 and f"notification {big} is failing" in done.stdout, done.stdout
    assert row["watermark"] is None


def test_the_same_name_over_a_new_query_is_refused_at_deploy_or_reset_by_choice(
    esb_server: Any, feeds: Callable[..., Feed], pg_url: str, tmp_path: Path
) -> None:
    old, new = feeds(pg_url), feeds(pg_url)
    name = old.name
    old.insert(range(1, 6), T0 + dt.timedelta(days=30))
    server = esb_server(workers=1)
    directory = str(server.directory)
    old.deploy(server)
    wait_until(lambda: len(old.delivered()) == 5, 30, message="the old query's rows")
    old.deploy(server, [], with_module=False)  # undeployed
    wait_until(lambda: all(n["name"] != name for n in server.status()["notifications"]), 30,
               message="undeployed")
    new.insert(range(1, 4), T0, body="ids")  # older than the old query's watermark
    over_new = old.definition(query=f"SELECT id, updated_at, body FROM {new.table}")
    done = try_deploy(server, tmp_path, pg_url, [over_new])
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert f"notification.sql.{name}" in said and "another query" in said and "on_change" in said, said
    # check-config says so of a file in config/ (esb start would refuse it alike).
    config_unit = server.directory / "config" / "sqlnotes.toml"
    config_unit.write_text(unit_text([{"name": "db", "url": pg_url}], [over_new]))
    done = esb("check-config", directory)
    config_unit.unlink()
    assert done.returncode == 2 and f"notification.sql.{name}.query" in done.stderr, done.stderr
    # Other watermark columns are refused alike.
    done = try_deploy(server, tmp_path, pg_url, [over_new | {"watermark": ["id"]}])
    assert done.returncode != 0 and "watermark columns" in done.stdout + done.stderr, done.stdout
    # By an explicit choice the new query starts from its first row.
    old.deploy(server, [over_new | {"on_change": "reset"}], with_module=False)
    wait_until(lambda: len(old.delivered()) == 8, 30, message="the new query's rows")
    assert [item["row"]["body"] for item in old.delivered()[5:]] == ["row 1", "row 2", "row 3"]
    # An operator's reset, to a value given as JSON, says what it did.
    done = esb("notifications", directory, "reset", name, "--to", json.dumps([T0.isoformat(), 1]))
    assert done.returncode == 0, done.stderr
    assert "reset" in done.stdout and "2030-01-01T00:00:00" in done.stdout, done.stdout
    wait_until(lambda: len(old.delivered()) == 10, 30, message="rows after the reset value again")
    assert [item["row"]["body"] for item in old.delivered()[8:]] == ["row 2", "row 3"]
    # A value that does not match the columns is refused, and so is a notification without
    # a watermark.
    done = esb("notifications", directory, "reset", name, "--to", "[1]")
    assert done.returncode != 0 and "2 values" in done.stderr, done.stderr
    assert esb("notifications", directory, "reset", "no-such-notification").returncode != 0
    assert feed_status_ok(server, name)
    # A stored watermark that is not the running definition's (as a deploy refuses it, a
    # run meets it only when the ODB was changed under it): without on_change the run
    # fails saying so, and the operator's reset ends it.
    old.deploy(server, [over_new], with_module=False)
    wait_until(lambda: workers_on_the_odbs_generation(server), 30, message="workers on the new generation")
    odb = create_engine(load_server_config(server.directory).odb_url)
    with odb.begin() as conn:
        conn.execute(text("UPDATE esb_notification_state SET watermark_of = :other WHERE name = :name"),
                     {"other": json.dumps({"columns": ["updated_at"], "query": "0"}), "name": name})
    odb.dispose()
    wait_until(failing_with(server, name, "not this definition's", f"reset {name}"), 30,
               message="the run refusing another definition's watermark")
    done = esb("notifications", directory, "reset", name)
    assert done.returncode == 0 and "from the first" in done.stdout, done.stdout
    wait_until(lambda: len(old.delivered()) == 13, 30, message="every row again after the reset")
    wait_until(lambda: old.status(server)["consecutive_failures"] == 0, 30, message="recovered")


def workers_on_the_odbs_generation(server: Server) -> bool:
    status = server.status()
    live = [w for w in status["workers"] if w["alive"]]
    return bool(live) and all(w["generation"] == status["deploy"]["generation"] for w in live)


def feed_status_ok(server: Server, name: str) -> bool:
    row = wait_until(lambda: (r := note_status(server, name))["runs"] and r, 30, message="a run")
    return row["consecutive_failures"] == 0

