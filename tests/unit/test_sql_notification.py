"""SQL notifications without a database: the keyset query esb wraps around the user's,
watermark values that keep their type, row values made JSON-able, the engine options."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

from esb.config import merge_units
from esb.config.definitions import SqlNotificationDef, SqlOutconnDef
from esb.notification import NOTIFICATION_SERVICE, as_job, notification_jobs
from esb.notification.runner import watermark_query
from esb.notification.store import decode_values, encode_values, jsonable
from esb.outgoing.sql import engine_options, mask_url


def note(**kwargs) -> SqlNotificationDef:
    return SqlNotificationDef(name="n", outconn="db", query="SELECT id, updated_at FROM t;",
                              service="s", **kwargs)


def test_watermark_query_orders_and_binds_the_keyset():
    definition = note(watermark=("updated_at", "id"))
    assert watermark_query(definition, has_watermark=False) == (
        "SELECT * FROM (SELECT id, updated_at FROM t) AS esb_q ORDER BY updated_at, id LIMIT :esb_limit"
    )
    assert watermark_query(definition, has_watermark=True) == (
        "SELECT * FROM (SELECT id, updated_at FROM t) AS esb_q"
        " WHERE (updated_at, id) > (:esb_wm_0, :esb_wm_1) ORDER BY updated_at, id LIMIT :esb_limit"
    )


def test_watermark_query_with_one_column_and_a_lag():
    definition = note(watermark=("updated_at",), lag_s=5)
    assert watermark_query(definition, has_watermark=True) == (
        "SELECT * FROM (SELECT id, updated_at FROM t) AS esb_q"
        " WHERE updated_at > :esb_wm_0 AND updated_at <= :esb_lag_until ORDER BY updated_at LIMIT :esb_limit"
    )


def test_watermark_values_keep_their_type():
    values = [dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC), 7, decimal.Decimal("1.50"), "a",
              dt.date(2030, 1, 2), uuid.UUID(int=5)]
    assert decode_values(encode_values(values)) == values
    assert decode_values(None) is None


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
