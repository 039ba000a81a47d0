"""SQL notifications without a database: the keyset query esb wraps around the user's,
watermark values that keep their type, row values made JSON-able, the engine options."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import uuid

from sqlalchemy.dialects import postgresql

from esb.config import merge_units
from esb.config.definitions import SqlNotificationDef, SqlOutconnDef
from esb.config.sqltext import statement_text, wrapping_problem
from esb.notification import NOTIFICATION_SERVICE, as_job, notification_jobs
from esb.notification.keyset import (
    deploy_problem,
    group_query,
    identity,
    nulls_query,
    on_stored,
    watermark_query,
)
from esb.notification.store import decode_values, encode_values, jsonable, typed_like
from esb.outgoing.sql import engine_options, mask_url


def note(**kwargs) -> SqlNotificationDef:
    return SqlNotificationDef(**{"name": "n", "outconn": "db", "query": "SELECT id, updated_at FROM t;",
                                 "service": "s", **kwargs})


PG = postgresql.dialect()


def test_watermark_query_orders_and_binds_the_keyset():
    definition = note(watermark=("updated_at", "id"))
    inner = "SELECT * FROM (\nSELECT id, updated_at FROM t\n) AS esb_q"
    assert watermark_query(definition, 0, PG) == (
        f"{inner} WHERE updated_at IS NOT NULL AND id IS NOT NULL ORDER BY updated_at, id LIMIT :esb_limit"
    )
    assert watermark_query(definition, 2, PG) == (
        f"{inner} WHERE updated_at IS NOT NULL AND id IS NOT NULL"
        " AND (updated_at, id) > (:esb_wm_0, :esb_wm_1) ORDER BY updated_at, id LIMIT :esb_limit"
    )
    # A watermark kept from a definition with fewer columns bounds those only.
    assert " AND updated_at > :esb_wm_0 ORDER BY" in watermark_query(definition, 1, PG)


def test_watermark_query_with_one_column_and_a_lag():
    definition = note(watermark=("updated_at",), lag_s=5)
    assert watermark_query(definition, 1, PG) == (
        "SELECT * FROM (\nSELECT id, updated_at FROM t\n) AS esb_q WHERE updated_at IS NOT NULL"
        " AND updated_at > :esb_wm_0 AND updated_at <= :esb_lag_until ORDER BY updated_at LIMIT :esb_limit"
    )


def test_watermark_columns_are_quoted_by_the_dialect_and_the_query_keeps_its_comments():
    definition = note(query='SELECT id, "order", "Stamp" FROM t -- the shop\'s orders',
                      watermark=("order", "Stamp"))
    query = watermark_query(definition, 2, PG)
    assert '("order", "Stamp") > (:esb_wm_0, :esb_wm_1) ORDER BY "order", "Stamp"' in query
    assert query.startswith("SELECT * FROM (\nSELECT id, \"order\", \"Stamp\" FROM t -- the shop's orders\n)")
    assert '"order" = :esb_wm_0 AND "Stamp" = :esb_wm_1' in group_query(definition, PG)
    assert '"order" IS NULL OR "Stamp" IS NULL' in nulls_query(definition, PG)


def test_the_keyset_query_runs_over_reserved_words_comments_and_a_final_semicolon(tmp_path):
    """Against a real SQLite: what the unit strings above promise, the database accepts."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path / 'q.db'}")
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE t (id INTEGER PRIMARY KEY, "order" INTEGER)'))
        conn.execute(text('INSERT INTO t (id, "order") VALUES (1, 10), (2, 20), (3, NULL)'))
    definition = note(query='SELECT id, "order" FROM t; -- ends here\n', watermark=("order", "id"))
    with engine.connect() as conn:
        rows = conn.execute(text(watermark_query(definition, 2, engine.dialect)),
                            {"esb_wm_0": 10, "esb_wm_1": 1, "esb_limit": 5}).all()
        assert [tuple(r) for r in rows] == [(2, 20)]
        nulls = conn.execute(text(nulls_query(definition, engine.dialect)), {"esb_limit": 5}).all()
        assert [r.id for r in nulls] == [3]
        count = conn.execute(text(nulls_query(definition, engine.dialect, count=True))).scalar()
        assert count == 1
    engine.dispose()


def test_statement_text_drops_a_final_semicolon_and_wrapping_problems_are_named():
    assert statement_text("SELECT 1 ; -- done\n") == "SELECT 1"
    assert statement_text("SELECT ';' -- x;") == "SELECT ';' -- x;"
    assert wrapping_problem("SELECT a FROM t WHERE b = 'LIMIT 3' -- LIMIT 4\n") is None
    assert wrapping_problem("SELECT a FROM t WHERE a IN (SELECT a FROM u LIMIT 1)") is None
    assert wrapping_problem("SELECT $$ ) $$ AS x, \"LIMIT\" FROM t /* ) LIMIT */") is None
    assert "LIMIT" in wrapping_problem("SELECT a FROM t ORDER BY a LIMIT 10")
    assert "one statement" in wrapping_problem("SELECT 1; SELECT 2")
    assert "closes no" in wrapping_problem("SELECT 1) AS x, (SELECT 2")
    assert "never closed" in wrapping_problem("SELECT (1")


def test_a_stored_watermark_is_gone_on_from_only_for_its_own_definition():
    base = note(watermark=("updated_at", "id"))
    stored = identity(base)
    assert on_stored(base, stored, [1, 2]) == ("same", None)
    assert on_stored(base, None, [1, 2])[0] == "adopt"  # stored by an esb that kept no identity
    assert on_stored(note(query="SELECT 2", watermark=("updated_at", "id")), stored, None)[0] == "adopt"
    assert identity(note(query="  SELECT id,\n updated_at FROM t ", watermark=("updated_at", "id"))) == stored
    other_query = note(query="SELECT id, updated_at FROM u", watermark=("updated_at", "id"))
    assert on_stored(other_query, stored, [1, 2]) == ("refuse", "it was stored for another query")
    key, reason = deploy_problem(other_query, stored, [1, 2])
    assert key == "query" and "on_change" in reason and "[1, 2]" in reason
    reset = dataclasses.replace(other_query, on_change="reset")
    assert on_stored(reset, stored, [1, 2])[0] == "reset" and deploy_problem(reset, stored, [1, 2]) is None
    assert on_stored(dataclasses.replace(other_query, on_change="keep"), stored, [1, 2])[0] == "keep"
    # Keeping needs the stored columns first among the new ones.
    one = note(watermark=("updated_at",))
    wider = note(watermark=("updated_at", "id"), on_change="keep")
    assert on_stored(wider, identity(one), [5])[0] == "keep"
    narrower = note(watermark=("updated_at",), on_change="keep")
    action, change = on_stored(narrower, stored, [1, 2])
    assert action == "refuse" and "watermark columns" in change
    assert deploy_problem(narrower, stored, [1, 2])[0] == "watermark"


def test_watermark_values_keep_their_type():
    values = [dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC), 7, decimal.Decimal("1.50"), "a",
              dt.date(2030, 1, 2), uuid.UUID(int=5)]
    assert decode_values(encode_values(values)) == values
    assert decode_values(None) is None
    # An operator's --to values take the stored watermark's types.
    stored = [dt.datetime(2030, 1, 1), 3, decimal.Decimal("1.5")]
    assert typed_like(["2030-02-01T00:00:00", 4, "2.5"], stored) == [
        dt.datetime(2030, 2, 1), 4, decimal.Decimal("2.5")]
    assert typed_like(["x"], None) == ["x"]


def test_row_values_become_json_able():
    assert jsonable(dt.datetime(2030, 1, 2, 3, 4, 5)) == "2030-01-02T03:04:05"
    assert jsonable(decimal.Decimal("1.50")) == "1.50"
    assert jsonable(b"\x00\x01") == "AAE="
    assert jsonable(3) == 3


def test_a_notification_is_a_job_fired_every_interval_without_overlap():
    job = as_job(note(interval_s=2.5, is_active=False))
    assert job.service == NOTIFICATION_SERVICE
    assert job.type == "interval" and job.interval_s == 2.5
    assert job.on_overlap == "skip" and job.coalesce and job.paused
    assert job.payload == {"notification": "n"}
    unit = """
[[outconn.sql]]
name = "db"
url = "sqlite:///x.db"

[[notification.sql]]
name = "n"
outconn = "db"
query = "SELECT 1"
service = "s"
watermark = ["id"]
"""
    definitions = merge_units([("u", unit)])
    assert list(notification_jobs(definitions)) == ["esb.notification:n"]
    assert definitions.of("notification.sql")["n"].mode == "watermark"


def test_engine_options_and_a_masked_url():
    definition = SqlOutconnDef(name="db", url="postgresql+psycopg://u:secret@h/db?options=-csearch_path%3Dx",
                               statement_timeout_s=2.5, pool_size=3)
    options = engine_options(definition)
    assert options["pool_size"] == 3
    assert options["connect_args"]["options"] == "-csearch_path=x -c statement_timeout=2500"
    assert "secret" not in mask_url(definition.url)
    assert "u:**@h" in mask_url(definition.url)


def test_backoff_grows_after_the_second_failure_and_stays_under_staleness():
    from esb.notification.runner import backoff_s

    assert [backoff_s(10, n) for n in range(5)] == [0, 0, 10, 20, 20]
    assert backoff_s(600, 9) == 60


def test_a_retired_engine_is_disposed_of_once_its_connections_are_back(tmp_path):
    import gevent

    from esb.outgoing import sql as outgoing_sql
    from esb.outgoing.sql import SqlOutconn

    old_def = SqlOutconnDef(name="db", url=f"sqlite:///{tmp_path / 'a.db'}")
    table = outgoing_sql.refresh({}, {"db": old_def})
    outconn = table["db"]
    assert isinstance(outconn, SqlOutconn) and outconn._engine is None  # made on first use
    conn = outconn.connect()
    pool = outconn.engine.pool
    same = outgoing_sql.refresh(table, {"db": old_def})
    assert same["db"] is outconn
    new = outgoing_sql.refresh(table, {"db": SqlOutconnDef(name="db", url=f"sqlite:///{tmp_path / 'b.db'}")})
    assert new["db"] is not outconn and outconn.is_retired
    gevent.sleep(outgoing_sql.RETIRE_POLL_S * 2)
    assert outconn.engine.pool is pool  # a request still holds a connection: not disposed of
    conn.close()
    gevent.sleep(outgoing_sql.RETIRE_POLL_S * 2)
    assert outconn.engine.pool is not pool  # disposed of (dispose() replaces the pool)


def test_session_commits_on_success_and_rolls_back_on_error(tmp_path):
    import pytest
    from sqlalchemy import text

    from esb.outgoing.sql import SqlOutconn

    outconn = SqlOutconn(SqlOutconnDef(name="db", url=f"sqlite:///{tmp_path / 's.db'}"))
    with outconn.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    with outconn.session() as session:
        session.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(ZeroDivisionError), outconn.session() as session:
        session.execute(text("INSERT INTO t VALUES (2)"))
        1 / 0  # noqa: B018
    with outconn.connect() as conn:
        assert conn.execute(text("SELECT x FROM t")).scalars().all() == [1]
    outconn.retire(wait=False)


def test_a_run_overtaken_by_a_later_claim_commits_nothing(tmp_path):
    """The fence a stopped worker's late run meets: only the last claimant's writes count,
    so the watermark never moves backwards. An ODB made before the fence gains its column."""
    from sqlalchemy import create_engine, text

    from esb.notification.store import NotificationStore, Superseded

    engine = create_engine(f"sqlite:///{tmp_path / 'odb.db'}")
    with engine.begin() as conn:  # the table as the first release made it
        conn.execute(text("CREATE TABLE esb_notification_state (name VARCHAR(255) PRIMARY KEY, "
                          "watermark TEXT, paused BOOLEAN, attempts INTEGER, updated_at DATETIME)"))
    store = NotificationStore(engine)
    assert store.claim("n", "late").watermark is None
    store.advance("n", [1], "late")
    assert store.claim("n", "next").watermark == [1]
    store.advance("n", [5], "next")
    for write in (lambda: store.advance("n", [2], "late"), lambda: store.count_attempt("n", "late"),
                  lambda: store.give_up("n", "late", [], "boom", 3, [2])):
        try:
            write()
        except Superseded:
            pass
        else:
            raise AssertionError("a superseded run wrote")
    assert store.holds("n", "next") and not store.holds("n", "late")
    assert store.state("n").watermark == [5] and store.state("n").attempts == 0
    assert store.count_attempt("n", "next") == 1
    assert store.dead_letters("n") == []
    engine.dispose()


def test_dead_letters_of_an_older_odb_gain_their_columns_and_are_retried_or_dropped(tmp_path):
    """An ODB made before dead letters could be handled gains state and row_keys; a
    plain-mode letter that is dropped keeps its row keys, a watermark one goes."""
    from sqlalchemy import create_engine, text

    from esb.notification.store import NotificationStore, row_key

    engine = create_engine(f"sqlite:///{tmp_path / 'odb.db'}")
    with engine.begin() as conn:  # the table as the release before made it
        conn.execute(text("CREATE TABLE esb_notification_dead (id INTEGER PRIMARY KEY, "
                          "name VARCHAR(255), run_id VARCHAR(32), created_at DATETIME, rows TEXT, "
                          "error TEXT, attempts INTEGER)"))
    store = NotificationStore(engine)
    store.claim("n", "r1")
    plain_rows = [{"id": 1, "body": "poison"}]
    store.give_up("n", "r1", plain_rows, "boom", 2, None, [row_key(r) for r in plain_rows])
    store.give_up("n", "r1", [{"id": 2}], "bang", 2, [2])
    plain, watermark = sorted(store.dead_letters("n"), key=lambda d: d["id"])
    assert store.dead_letter_counts() == {"n": 2}
    assert store.ask_retry(plain["id"]) == "n" and store.ask_retry(999) is None
    assert [d["id"] for d in store.retries("n")] == [plain["id"]]
    assert store.take_retry("n", "r1", plain["id"], plain["attempts"])
    assert not store.take_retry("n", "r1", plain["id"], plain["attempts"])  # taken once
    assert store.drop(plain["id"]) and store.drop(watermark["id"]) and not store.drop(watermark["id"])
    assert store.dead_letters("n") == [] and store.dead_letter_counts() == {}
    assert store.dead_row_keys("n") == {row_key(plain_rows[0])}
    engine.dispose()


def test_driver_types_and_arrays_become_json_able():
    import ipaddress

    assert jsonable([decimal.Decimal("1.5"), None]) == ["1.5", None]
    assert jsonable({"at": dt.date(2030, 1, 2)}) == {"at": "2030-01-02"}
    assert jsonable(ipaddress.ip_address("10.0.0.1")) == "10.0.0.1"


def test_a_reset_supersedes_the_running_run_and_a_null_is_never_stored(tmp_path):
    """The operator's reset and a run's rebase, on an ODB made before watermarks carried
    their definition (the column is added); advancing to a NULL is refused."""
    import pytest
    from sqlalchemy import create_engine, text

    from esb.errors import WatermarkProblem
    from esb.notification.store import NotificationStore, Superseded

    engine = create_engine(f"sqlite:///{tmp_path / 'odb.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE esb_notification_state (name VARCHAR(255) PRIMARY KEY, "
                          "watermark TEXT, paused BOOLEAN, attempts INTEGER, updated_at DATETIME, "
                          "run_id VARCHAR(32))"))
    store = NotificationStore(engine)
    assert store.claim("n", "r1").watermark_of is None
    store.advance("n", [1, 2], "r1")
    with pytest.raises(WatermarkProblem):
        store.advance("n", [None, 3], "r1")
    store.rebase("n", "r1", "id-a", reset=False)
    assert store.state("n").watermark == [1, 2] and store.state("n").watermark_of == "id-a"
    before = store.reset("n", "id-b", [5, 6])
    assert before.watermark == [1, 2] and before.watermark_of == "id-a"
    assert store.state("n").watermark == [5, 6] and store.state("n").watermark_of == "id-b"
    with pytest.raises(Superseded):  # the run in progress commits nothing more
        store.advance("n", [7, 8], "r1")
    store.claim("n", "r2")
    store.rebase("n", "r2", "id-c", reset=True)
    assert store.state("n").watermark is None and store.state("n").watermark_of == "id-c"
    assert store.reset("m", "id-m", None).watermark is None  # a name without a row yet
    engine.dispose()


def test_a_reset_value_must_match_the_watermark_columns():
    from esb.cli.notifications import _watermark_value

    assert _watermark_value('["2030-01-01T00:00:00", 4]', ("updated_at", "id")) == (
        None, ["2030-01-01T00:00:00", 4])
    assert _watermark_value("7", ("id",)) == (None, [7])
    assert "needs 2 values" in _watermark_value("[1]", ("updated_at", "id"))[0]
    assert "not JSON" in _watermark_value("[1,", ("id",))[0]
    assert "NULL" in _watermark_value("[null]", ("id",))[0]
