"""Outgoing SQL connections and SQL notifications through real server processes, against
PostgreSQL (a schema of the test's own, dropped afterwards) and SQLite (a file in tmp_path).

The deployed service ``sqlnote.collect`` (deployables/sqlnote.py) appends every row it
receives to the Redis list ``sqlnote:<notification>``; the tests count what arrived.
"""

from __future__ import annotations

import datetime as dt
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from tests.helpers import Server, esb, free_port, wait_until

DEPLOYABLES = Path(__file__).parent / "deployables"


@pytest.fixture(params=["postgres", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    """(url, engine) of a database of the test's own."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'data.db'}"
    engine = create_engine(url)
    yield url, engine
    engine.dispose()


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
        lines += ["[[notification.sql]]", *(f"{k} = {toml_value(v)}" for k, v in body.items()), ""]
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


def make_table(engine: Engine, table: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, updated_at TIMESTAMP NOT NULL, "
                          f"body VARCHAR(100), done INTEGER DEFAULT 0)"))


def insert(engine: Engine, table: str, ids: range, updated_at: dt.datetime, body: str = "x") -> None:
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} (id, updated_at, body) VALUES (:id, :u, :b)"),
                     [{"id": i, "u": updated_at, "b": body if body != "ids" else f"row {i}"} for i in ids])


def delivered(redis_client: redis.Redis, name: str) -> list[dict]:
    return [json.loads(item) for item in redis_client.lrange(f"sqlnote:{name}", 0, -1)]


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


# -- delivery ------------------------------------------------------------------------------


def test_watermark_delivers_rows_sharing_a_timestamp_exactly_once(
    esb_server: Any, tmp_path: Path, db: tuple[str, Engine], redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    url, engine = db
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    same = dt.datetime(2030, 1, 1, 12, 0, 0)
    insert(engine, table, range(1, 501), same, body="ids")
    server = esb_server(workers=2)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": url}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, updated_at, body FROM {table}",
          "watermark": ["updated_at", "id"], "max_rows": 100, "batch_size": 30}],
    ))
    wait_until(lambda: len(delivered(redis_client, name)) >= 500, 60, message="500 rows delivered")
    # Rows inserted later, with a later timestamp, come too.
    insert(engine, table, range(501, 521), same + dt.timedelta(seconds=1), body="ids")
    wait_until(lambda: len(delivered(redis_client, name)) >= 520, 30, message="20 more rows delivered")
    runs = note_status(server, name)["runs"]
    wait_until(lambda: note_status(server, name)["runs"] >= runs + 2, 30, message="two further runs")
    items = delivered(redis_client, name)
    ids = Counter(item["row"]["id"] for item in items)
    assert sorted(ids) == list(range(1, 521))
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    first = items[0]
    assert first["mode"] == "watermark"
    assert first["row"]["body"] == f"row {first['row']['id']}"
    assert isinstance(first["row"]["updated_at"], str)  # JSON-able: ISO text
    status = note_status(server, name)
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


def test_plain_mode_with_after_success_marks_rows(
    esb_server: Any, tmp_path: Path, db: tuple[str, Engine], redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    pg_url, engine = db
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    insert(engine, table, range(1, 51), dt.datetime(2030, 1, 1), body="ids")
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": pg_url, "statement_timeout_s": 5}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, body FROM {table} WHERE done = 0 ORDER BY id",
          "batch_size": 20, "max_rows": 20,
          "after_success": f"UPDATE {table} SET done = 1 WHERE id IN :ids"}],
    ))
    wait_until(lambda: len(delivered(redis_client, name)) >= 50, 60, message="50 rows delivered")
    with engine.connect() as conn:
        wait_until(lambda: conn.execute(text(f"SELECT count(*) FROM {table} WHERE done = 0")).scalar() == 0,
                   10, message="every row marked")
    assert sorted(item["row"]["id"] for item in delivered(redis_client, name)) == list(range(1, 51))
    assert {item["mode"] for item in delivered(redis_client, name)} == {"plain"}


# -- failures ------------------------------------------------------------------------------


def test_query_errors_show_the_databases_message_while_a_healthy_one_delivers(
    esb_server: Any, tmp_path: Path, db: tuple[str, Engine], redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    url, engine = db
    good, syntax, missing = new_name(sql_keys, "g"), new_name(sql_keys, "s"), new_name(sql_keys, "m")
    table = f"t_{good}"
    make_table(engine, table)
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": url}],
        [{"name": good, "outconn": "db", "query": f"SELECT id, updated_at FROM {table}",
          "watermark": ["id"]},
         {"name": syntax, "outconn": "db", "query": "SELEC id FROM nowhere", "watermark": ["id"]},
         {"name": missing, "outconn": "db", "query": "SELECT id FROM no_such_table_here"}],
    ))
    insert(engine, table, range(1, 11), dt.datetime(2030, 1, 1))
    wait_until(lambda: len(delivered(redis_client, good)) >= 10, 30, message="healthy notification delivers")

    def failing(name: str) -> dict | None:
        row = note_status(server, name)
        return row if row["consecutive_failures"] >= 2 else None

    syntax_row = wait_until(lambda: failing(syntax), 30, message="syntax error seen twice")
    missing_row = wait_until(lambda: failing(missing), 30, message="missing table seen twice")
    assert "syntax error" in syntax_row["last_error"].lower()
    assert "no_such_table_here" in missing_row["last_error"]
    assert syntax_row["last_outcome"] == "failed"
    insert(engine, table, range(11, 21), dt.datetime(2030, 1, 2))
    wait_until(lambda: len(delivered(redis_client, good)) >= 20, 30, message="still delivering")
    done = esb("status", str(server.directory))
    assert done.returncode != 0
    assert f"notification {syntax} is failing" in done.stdout + done.stderr
    # The failure is logged once per change of state, not once per run.
    log = server.log()
    assert log.count(f"notification {syntax}") <= 3, log[-3000:]


def test_a_failing_batch_is_retried_then_dead_lettered_and_later_rows_flow(
    esb_server: Any, tmp_path: Path, db: tuple[str, Engine], redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    url, engine = db
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    base = dt.datetime(2030, 1, 1)
    insert(engine, table, range(1, 6), base)
    insert(engine, table, range(6, 7), base + dt.timedelta(seconds=1), body="poison")
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": url}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, updated_at, body FROM {table}",
          "watermark": ["updated_at", "id"], "batch_size": 5, "max_attempts": 3}],
    ))
    wait_until(lambda: len(delivered(redis_client, name)) >= 5, 30, message="first batch")
    # The poisoned batch fails, the watermark stays before it...
    wait_until(lambda: int(redis_client.get(f"sqlnote:{name}:poisoned") or 0) >= 1, 30, message="poison seen")
    row = note_status(server, name)
    assert row["watermark"][1] == 5
    # ...until its third attempt, which dead-letters it; later rows then flow.
    wait_until(lambda: int(redis_client.get(f"sqlnote:{name}:poisoned") or 0) >= 3, 30,
               message="three attempts")
    wait_until(lambda: note_status(server, name)["watermark"][1] == 6, 30, message="moved past the batch")
    insert(engine, table, range(7, 12), base + dt.timedelta(seconds=2))
    wait_until(lambda: len(delivered(redis_client, name)) >= 10, 60, message="rows after the poison")
    assert int(redis_client.get(f"sqlnote:{name}:poisoned")) == 3
    got = sorted(item["row"]["id"] for item in delivered(redis_client, name))
    assert got == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    done = esb("notifications", str(server.directory), "--failed", "--json")
    assert done.returncode == 0, done.stderr
    dead = [d for d in json.loads(done.stdout) if d["name"] == name]
    assert len(dead) == 1
    assert dead[0]["attempts"] == 3
    assert [r["id"] for r in dead[0]["rows"]] == [6]
    assert "poisoned" in dead[0]["error"]
    wait_until(lambda: note_status(server, name)["consecutive_failures"] == 0, 30, message="recovered")


# -- processes -----------------------------------------------------------------------------


def test_kill_9_of_the_running_worker_loses_no_row(
    esb_server: Any, tmp_path: Path, pg_url: str, redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    engine = create_engine(pg_url)
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    server = esb_server(workers=2)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": pg_url}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, updated_at FROM {table}",
          "watermark": ["updated_at", "id"], "batch_size": 10}],
    ))
    stop = threading.Event()
    inserted: list[int] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            insert(engine, table, range(i + 1, i + 11), dt.datetime.now(dt.UTC).replace(tzinfo=None))
            inserted.extend(range(i + 1, i + 11))
            i += 10
            time.sleep(0.05)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for _ in range(2):
            wait_until(lambda: note_status(server, name)["last_pid"] in server.worker_pids(), 30,
                       message="a worker ran the notification")
            victim = note_status(server, name)["last_pid"]
            runs = note_status(server, name)["runs"]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda runs=runs: note_status(server, name)["runs"] >= runs + 2, 30,
                       message="polling resumed after kill -9")
    finally:
        stop.set()
        thread.join(timeout=30)
    expected = set(inserted)
    wait_until(lambda: {i["row"]["id"] for i in delivered(redis_client, name)} >= expected, 60,
               message="every inserted row delivered")
    counts = Counter(i["row"]["id"] for i in delivered(redis_client, name))
    repeated = [i for i, n in counts.items() if n > 1]
    # At least once: a repeat only when a kill fell between a batch's call and its
    # watermark commit, so at most one batch (10 rows) per kill.
    assert len(repeated) <= 20, repeated
    engine.dispose()


def test_two_servers_sharing_odb_and_redis_deliver_each_row_once(
    esb_server: Any, tmp_path: Path, pg_url: str, redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    engine = create_engine(pg_url)
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    first = esb_server(odb=pg_url, workers=1, name="one")
    second = esb_server(odb=pg_url, workers=1, name="two")
    deploy(first, tmp_path, unit_text(
        [{"name": "db", "url": pg_url}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, updated_at FROM {table}",
          "watermark": ["updated_at", "id"], "batch_size": 7}],
    ))
    for step in range(10):
        insert(engine, table, range(step * 30 + 1, step * 30 + 31), dt.datetime(2030, 1, 1, 0, step))
        time.sleep(0.3)
    wait_until(lambda: len(delivered(redis_client, name)) >= 300, 60, message="300 rows delivered")
    runs = note_status(first, name)["runs"]
    wait_until(lambda: note_status(first, name)["runs"] >= runs + 2, 30, message="two further runs")
    counts = Counter(i["row"]["id"] for i in delivered(redis_client, name))
    assert sorted(counts) == list(range(1, 301))
    assert max(counts.values()) == 1
    engine.dispose()
    assert second.answers()


# -- outgoing connections ------------------------------------------------------------------


def test_outconn_connect_and_session_and_a_slow_query_does_not_block_the_worker(
    esb_server: Any, tmp_path: Path, pg_url: str
) -> None:
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text([{"name": "db", "url": pg_url, "pool_size": 2}], []))
    wait_until(lambda: server.post("/sqlnote/query", {"outconn": "db", "sql": "SELECT 1 AS one"}).status_code
               == 200, 30, message="query channel deployed")
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
    esb_server: Any, tmp_path: Path, redis_client: redis.Redis, sql_keys: list[str], cluster: str
) -> None:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    engine = create_engine(url)
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    server = esb_server(workers=1)
    definition = {"name": name, "outconn": "db", "query": f"SELECT id, updated_at, body FROM {table}",
                  "watermark": ["id"]}
    deploy(server, tmp_path, unit_text([{"name": "db", "url": url}], [definition]))
    day = dt.datetime(2030, 1, 1)
    insert(engine, table, range(1, 6), day)
    wait_until(lambda: len(delivered(redis_client, name)) == 5, 30, message="first rows")
    directory = str(server.directory)

    def job_runs() -> int:
        return int(redis_client.hget(f"esb:{cluster}:job:esb.notification:{name}", "runs") or 0)

    # The operator's pause: firings end at once, nothing is delivered.
    assert esb("notifications", directory, "pause", name).returncode == 0
    wait_until(lambda: note_status(server, name)["paused"], 10, message="paused in status")
    insert(engine, table, range(6, 11), day)
    runs = job_runs()
    wait_until(lambda: job_runs() >= runs + 2, 30, message="two firings while paused")
    assert len(delivered(redis_client, name)) == 5
    assert esb("notifications", directory, "resume", name).returncode == 0
    wait_until(lambda: len(delivered(redis_client, name)) == 10, 30, message="rows after resume")
    done = esb("notifications", directory, "run", name)
    assert done.returncode == 0, done.stderr
    listing = esb("notifications", directory)
    assert name in listing.stdout and "watermark" in listing.stdout
    # A hot deploy that pauses: the scheduler no longer fires it.
    deploy(server, tmp_path, unit_text([{"name": "db", "url": url}], [definition | {"is_active": False}]),
           with_module=False)
    wait_until(lambda: not note_status(server, name)["active"] and not note_status(server, name)["next_run"],
               30, message="deactivated by deploy")
    assert esb("status", directory).returncode == 0  # a paused notification is not a problem
    insert(engine, table, range(11, 16), day)
    insert(engine, table, range(16, 18), day, body="skip")
    # A hot deploy that changes the query (and activates it again).
    changed = definition | {"query": f"SELECT id, updated_at, body FROM {table} WHERE body <> 'skip'"}
    deploy(server, tmp_path, unit_text([{"name": "db", "url": url}], [changed]), with_module=False)
    wait_until(lambda: len(delivered(redis_client, name)) == 15, 30, message="rows of the changed query")
    assert sorted(i["row"]["id"] for i in delivered(redis_client, name)) == list(range(1, 16))
    # A hot deploy that removes it.
    deploy(server, tmp_path, unit_text([{"name": "db", "url": url}], []), with_module=False)
    wait_until(lambda: all(n["name"] != name for n in server.status()["notifications"]), 30,
               message="removed from status")
    assert esb("notifications", directory, "run", name).returncode != 0
    engine.dispose()


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
    esb_server: Any, tmp_path: Path, private_pg: PrivatePostgres, redis_client: redis.Redis,
    sql_keys: list[str]
) -> None:
    engine = create_engine(private_pg.url, pool_pre_ping=True)
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": private_pg.url, "pool_timeout_s": 2, "connect_args": {"connect_timeout": 2}}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, updated_at FROM {table}",
          "watermark": ["updated_at", "id"]}],
    ))
    insert(engine, table, range(1, 11), dt.datetime(2030, 1, 1))
    wait_until(lambda: len(delivered(redis_client, name)) == 10, 30, message="rows before the outage")
    private_pg.stop()
    row = wait_until(lambda: (r := note_status(server, name))["consecutive_failures"] >= 2 and r, 60,
                     message="failures in status")
    assert row["last_error"] and row["last_outcome"] == "failed"
    done = esb("status", str(server.directory))
    assert done.returncode != 0 and f"notification {name} is failing" in done.stdout + done.stderr
    private_pg.start()
    insert(engine, table, range(11, 21), dt.datetime(2030, 1, 2))
    wait_until(lambda: len(delivered(redis_client, name)) >= 20, 60, message="rows after the outage")
    wait_until(lambda: note_status(server, name)["consecutive_failures"] == 0, 30, message="recovered")
    assert sorted(i["row"]["id"] for i in delivered(redis_client, name)) == list(range(1, 21))
    wait_until(lambda: esb("status", str(server.directory)).returncode == 0, 30, message="status healthy")
    log = server.log()
    assert log.count(f"database unreachable: notification {name}") <= 2, log[-3000:]
    assert f"database works again: notification {name}" in log
    engine.dispose()


def test_status_shows_each_outgoing_sql_connection_with_a_masked_url(
    esb_server: Any, tmp_path: Path, pg_url: str
) -> None:
    server = esb_server(workers=1)
    url = pg_url.replace("postgresql+psycopg://", "postgresql+psycopg://postgres:s3cret@")
    deploy(server, tmp_path, unit_text([{"name": "db", "url": url}], []))
    wait_until(lambda: server.post("/sqlnote/query", {"outconn": "db", "sql": "SELECT 1 AS one"}).status_code
               == 200, 30, message="query channel deployed")

    def outconn() -> dict | None:
        rows = server.status()["outconns"]["sql"]
        return rows[0] if rows and rows[0]["reachable"] is not None else None

    row = wait_until(outconn, 30, message="outconn.sql pinged")
    assert row["name"] == "db" and row["reachable"] is True and row["pool_size"] == 5
    assert "s3cret" not in json.dumps(server.status()) and "***" in row["url"]


def test_kill_9_of_the_scheduler_polling_resumes_and_no_row_is_lost(
    esb_server: Any, tmp_path: Path, redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'sched.db'}"
    engine = create_engine(url)
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": url}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, updated_at FROM {table}",
          "watermark": ["id"]}],
    ))
    next_id = 1
    for _ in range(2):
        insert(engine, table, range(next_id, next_id + 10), dt.datetime(2030, 1, 1))
        next_id += 10
        wait_until(lambda n=next_id: len(delivered(redis_client, name)) >= n - 1, 30,
                   message="rows delivered")
        scheduler = server.status()["scheduler"]
        assert scheduler["active"]
        os.kill(scheduler["pid"], signal.SIGKILL)
        wait_until(lambda old=scheduler["pid"]: (s := server.status()["scheduler"])["active"]
                   and s["pid"] != old, 60, message="a new scheduler active")
    insert(engine, table, range(next_id, next_id + 10), dt.datetime(2030, 1, 1))
    wait_until(lambda: len(delivered(redis_client, name)) >= 30, 30, message="rows after the restarts")
    counts = Counter(i["row"]["id"] for i in delivered(redis_client, name))
    assert sorted(counts) == list(range(1, 31)) and max(counts.values()) == 1
    engine.dispose()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_200000_row_backlog_drains_without_the_worker_growing(
    esb_server: Any, tmp_path: Path, pg_url: str, redis_client: redis.Redis, sql_keys: list[str]
) -> None:
    engine = create_engine(pg_url)
    name = new_name(sql_keys)
    table = f"t_{name}"
    make_table(engine, table)
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} (id, updated_at, body) SELECT g, TIMESTAMP '2030-01-01' "
                          "+ (g / 1000) * INTERVAL '1 second', repeat('x', 80) "
                          "FROM generate_series(1, 200000) g"))
    server = esb_server(workers=1)
    deploy(server, tmp_path, unit_text([{"name": "db", "url": pg_url}], []))
    wait_until(lambda: server.post("/sqlnote/query", {"outconn": "db", "sql": "SELECT 1 AS one"}).status_code
               == 200, 30, message="query channel deployed")
    (worker,) = server.worker_pids()
    before = rss_kb(worker)
    deploy(server, tmp_path, unit_text(
        [{"name": "db", "url": pg_url}],
        [{"name": name, "outconn": "db", "query": f"SELECT id, updated_at, body FROM {table}",
          "watermark": ["updated_at", "id"], "max_rows": 1000, "batch_size": 1000,
          "service": "sqlnote.count"}],
    ), with_module=False)
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
    engine.dispose()
