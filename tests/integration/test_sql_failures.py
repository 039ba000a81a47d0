"""SQL notifications that fail, through real server processes on PostgreSQL: a run fails as
a run whatever it raises, a batch whose service kills its worker is dead-lettered after
``max_attempts``, dead letters show in status and can be listed, retried and dropped, a
driver that cannot load is refused at deploy, and a run draining a backlog is not stale.

The services are deployables/notefail.py's; a ``Feed`` (tests/integration/test_sql.py)
is the tests' handle on a notification's table and on what its service received.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

from esb.bus import Keys
from esb.config import load_server_config
from esb.notification.store import NotificationStore
from esb.odb import UNIT, OdbStore
from tests.helpers import Server, esb, wait_until
from tests.integration.test_sql import DEPLOYABLES, Feed, deploy, note_status, unit_text

BASE = dt.datetime(2030, 1, 1)


@pytest.fixture
def make_feed(pg_url: str, tmp_path: Path, redis_client: redis.Redis) -> Iterator[Any]:
    """Factory of Feeds on the test's PostgreSQL schema, each with a fresh table; their
    Redis keys (sqlnote:<name>*, notefail:<name>*) are deleted afterwards."""
    made: list[Feed] = []

    def make() -> Feed:
        feed = Feed(pg_url, create_engine(pg_url), f"f{uuid.uuid4().hex[:8]}", redis_client, tmp_path)
        with feed.engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {feed.table} (id INTEGER PRIMARY KEY, updated_at TIMESTAMP "
                              "NOT NULL, body VARCHAR(100), done INTEGER DEFAULT 0)"))
        made.append(feed)
        return feed

    yield make
    for feed in made:
        feed.engine.dispose()
        for pattern in (f"sqlnote:{feed.name}*", f"notefail:{feed.name}*"):
            for key in redis_client.scan_iter(match=pattern):
                redis_client.delete(key)


def deploy_notes(server: Server, feed: Feed, notes: list[dict]) -> None:
    done = server.deploy(DEPLOYABLES / "notefail.py")
    assert done.returncode == 0, done.stdout + done.stderr
    deploy(server, feed.tmp_path, unit_text([{"name": "db", "url": feed.url}], notes, channels=False),
           with_module=False)


def dead_letters(server: Server, name: str) -> list[dict]:
    store = NotificationStore(create_engine(load_server_config(server.directory).odb_url))
    try:
        return store.dead_letters(name)
    finally:
        store.engine.dispose()


def ids(feed: Feed) -> list[int]:
    return sorted(feed.counts())


def status_text(server: Server) -> tuple[int, str]:
    done = esb("status", str(server.directory))
    return done.returncode, done.stdout + done.stderr


def test_a_batch_whose_service_kills_its_worker_is_dead_lettered_after_max_attempts(
    esb_server: Any, make_feed: Any, redis_client: redis.Redis, cluster: str
) -> None:
    feed = make_feed()
    feed.insert(range(1, 3), BASE, body="ids")
    feed.insert(range(3, 4), BASE + dt.timedelta(seconds=1), body="exit")
    server = esb_server(workers=2)
    deploy_notes(server, feed, [feed.definition(service="notefail.exit", batch_size=1, max_attempts=2)])
    wait_until(lambda: ids(feed) == [1, 2], 30, message="the rows before the poison")
    feed.insert(range(4, 6), BASE + dt.timedelta(seconds=2), body="ids")
    wait_until(lambda: dead_letters(server, feed.name), 90, message="the killing batch dead-lettered")
    wait_until(lambda: ids(feed) == [1, 2, 4, 5], 30, message="the rows after the poison")
    exits = int(redis_client.get(f"notefail:{feed.name}:exits") or 0)
    deaths = redis_client.zcard(Keys(cluster).worker_deaths)
    assert exits == 2, exits
    assert deaths <= 2, deaths
    [letter] = dead_letters(server, feed.name)
    assert [row["id"] for row in letter["rows"]] == [3]
    assert letter["attempts"] == 2
    assert "worker" in letter["error"], letter["error"]
    code, said = status_text(server)
    assert code != 0
    assert f"notification {feed.name}: 1 dead-lettered batch" in said, said
    # No further worker dies: later firings pass the batch by.
    runs = feed.status(server)["runs"]
    wait_until(lambda: feed.status(server)["runs"] >= runs + 2, 30, message="two further runs")
    assert int(redis_client.get(f"notefail:{feed.name}:exits") or 0) == 2


def test_a_killing_batch_is_owned_by_max_attempts_not_by_dispatch_max_deliveries(
    esb_server: Any, make_feed: Any, redis_client: redis.Redis, cluster: str
) -> None:
    """max_attempts above [dispatch] max_deliveries: the batch is dead-lettered once, as the
    notification's, and no firing lands in the dispatch dead-letter stream beside it."""
    feed = make_feed()
    feed.insert(range(1, 2), BASE, body="exit")
    server = esb_server(workers=2, conf={("dispatch", "max_deliveries"): 1})
    deploy_notes(server, feed, [feed.definition(service="notefail.exit", batch_size=1, max_attempts=2)])
    wait_until(lambda: dead_letters(server, feed.name), 90, message="the killing batch dead-lettered")
    assert int(redis_client.get(f"notefail:{feed.name}:exits") or 0) == 2
    assert redis_client.xlen(Keys(cluster).dead_letters) == 0


def test_plain_mode_dead_letters_a_batch_once_and_failed_retry_drop_handle_it(
    esb_server: Any, make_feed: Any, redis_client: redis.Redis
) -> None:
    feed = make_feed()
    name, table, flags = feed.name, feed.table, f"notefail:{feed.name}"
    redis_client.set(f"{flags}:table", table)
    feed.insert(range(1, 3), BASE, body="ids")
    feed.insert(range(3, 5), BASE, body="poison")
    feed.insert(range(5, 6), BASE, body="ids")
    server = esb_server(workers=1)
    deploy_notes(server, feed, [feed.definition(
        service="notefail.mark", watermark=None, batch_size=2, max_attempts=1,
        query=f"SELECT id, body FROM {table} WHERE done = 0 ORDER BY id")])
    wait_until(lambda: ids(feed) == [1, 2, 5], 30, message="the rows around the poison")
    runs = feed.status(server)["runs"]
    wait_until(lambda: feed.status(server)["runs"] >= runs + 4, 30, message="four further runs")
    letters = dead_letters(server, name)
    assert len(letters) == 1, letters  # dead-lettered once, not again at every run
    assert [row["id"] for row in letters[0]["rows"]] == [3, 4]
    assert int(redis_client.get(f"{flags}:poisoned")) == 1
    letter_id = str(letters[0]["id"])
    code, said = status_text(server)
    assert code != 0
    assert f"notification {name}: 1 dead-lettered batch" in said, said
    rows = json.loads(esb("notifications", str(server.directory), "--json").stdout)
    assert next(r for r in rows if r["name"] == name)["dead_letters"] == 1

    listed = esb("notifications", str(server.directory), "failed")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.split()[:1] == [letter_id])
    assert name in line and "2 rows" in line and "poisoned" in line, listed.stdout
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", line), line
    for action in ("retry", "drop"):
        bad = esb("notifications", str(server.directory), action, "999999")
        assert bad.returncode != 0
        assert "no dead letter 999999" in bad.stderr, bad.stderr

    # Retried once the service is fixed: the rows are delivered and the letter is gone.
    redis_client.set(f"{flags}:cured", "1")
    done = esb("notifications", str(server.directory), "retry", letter_id)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: ids(feed) == [1, 2, 3, 4, 5], 30, message="the retried rows delivered")
    wait_until(lambda: not dead_letters(server, name), 30, message="the retried letter gone")
    wait_until(lambda: status_text(server)[0] == 0, 30, message="status healthy again")

    # Dropped: gone from status and the list, and its rows are not offered again.
    redis_client.delete(f"{flags}:cured")
    feed.insert(range(6, 7), BASE, body="poison")
    [letter] = wait_until(lambda: dead_letters(server, name), 30, message="a second letter")
    done = esb("notifications", str(server.directory), "drop", str(letter["id"]))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: status_text(server)[0] == 0, 30, message="status healthy after the drop")
    listed = esb("notifications", str(server.directory), "failed", "--json")
    assert json.loads(listed.stdout) == []
    runs = feed.status(server)["runs"]
    wait_until(lambda: feed.status(server)["runs"] >= runs + 2, 30, message="two further runs")
    assert int(redis_client.get(f"{flags}:poisoned")) == 2


def test_a_run_failing_with_any_exception_is_a_failed_run_and_the_next_firing_runs(
    esb_server: Any, make_feed: Any, redis_client: redis.Redis
) -> None:
    escaping, odd = make_feed(), make_feed()
    redis_client.set(f"notefail:{escaping.name}:escape", "1")
    escaping.insert(range(1, 4), BASE, body="ids")
    odd.insert(range(1, 2), BASE, body="poison")
    odd.insert(range(2, 3), BASE + dt.timedelta(seconds=1), body="ids")
    server = esb_server(workers=1)
    # Values json cannot take as they come from the driver: an inet, an array of numerics.
    odd_query = (f"SELECT id, updated_at, body, '10.0.0.1'::inet AS addr, "
                 f"ARRAY[1.5::numeric] AS amounts FROM {odd.table}")
    deploy_notes(server, escaping, [
        escaping.definition(service="notefail.escape"),
        odd.definition(service="notefail.mark", query=odd_query, batch_size=1, max_attempts=1),
    ])
    failed = wait_until(lambda: (row := note_status(server, escaping.name))["last_outcome"] == "failed"
                        and row, 30, message="a failed run in status")
    assert "Timeout" in failed["last_error"], failed
    wait_until(lambda: f"notification {escaping.name}" in server.log() and "Timeout" in server.log(),
               10, message="the failure in server.log")
    redis_client.delete(f"notefail:{escaping.name}:escape")
    wait_until(lambda: ids(escaping) == [1, 2, 3], 2 * 1 + 10, message="the next firing delivers")
    assert note_status(server, escaping.name)["last_outcome"] == "ok"

    [letter] = wait_until(lambda: dead_letters(server, odd.name), 30, message="the odd batch dead-lettered")
    assert letter["rows"][0]["addr"] == "10.0.0.1"
    assert letter["rows"][0]["amounts"] == ["1.5"]
    wait_until(lambda: ids(odd) == [2], 30, message="the row after it")

    # A driver package gone after the deploy (deploy refuses one missing now): the unit
    # goes into the ODB as an older esb stored it; workers pick it up by polling.
    nodriver = f"n{uuid.uuid4().hex[:8]}"
    odb = OdbStore(load_server_config(server.directory).odb_url)
    try:
        odb.put(UNIT, "legacy.toml", unit_text(
            [{"name": "legacy", "url": "postgresql+psycopg2://u@127.0.0.1/db"}],
            [{"name": nodriver, "outconn": "legacy", "query": "SELECT 1 AS id", "watermark": ["id"],
              "service": "notefail.mark"}], channels=False))
    finally:
        odb.dispose()
    row = wait_until(lambda: (row := note_status(server, nodriver))["runs"] >= 2 and row, 30,
                     message="two failed runs of the notification without its driver")
    assert row["last_outcome"] == "failed" and "psycopg2" in row["last_error"], row


def test_a_run_draining_a_backlog_is_not_stale_while_it_moves_rows(
    esb_server: Any, make_feed: Any, redis_client: redis.Redis
) -> None:
    feed = make_feed()
    redis_client.set(f"notefail:{feed.name}:sleep_s", "0.5")
    feed.insert(range(1, 31), BASE, body="ids")
    server = esb_server(workers=1)
    deploy_notes(server, feed, [feed.definition(service="notefail.slow", batch_size=1, interval_s=1)])
    wait_until(lambda: feed.delivered(), 30, message="the drain started")
    seen: list[tuple[int, bool]] = []
    deadline = time.monotonic() + 30
    while len(feed.delivered()) < 30 and time.monotonic() < deadline:
        row = feed.status(server)
        seen.append((len(feed.delivered()), row["stale"]))
    assert len(feed.delivered()) >= 30, seen
    assert len(seen) >= 5, seen  # status was asked all along the run (15 s)
    assert not [s for s in seen if s[1]], seen


def test_an_sql_driver_that_cannot_load_is_refused_at_deploy(esb_server: Any, tmp_path: Path) -> None:
    server = esb_server(workers=1, start=False)
    for url, why in (("postgresql+nosuchdriver://u@127.0.0.1/db", "nosuchdriver"),
                     ("postgresql+psycopg2://u@127.0.0.1/db", "psycopg2")):
        unit = tmp_path / "drivers.toml"
        unit.write_text(unit_text([{"name": "db", "url": url}], [], channels=False))
        done = server.deploy(unit)
        said = done.stdout + done.stderr
        assert done.returncode != 0, said
        assert "drivers.toml" in said and "outconn.sql.db.url" in said and why in said, said
