"""Outgoing SQL: ``self.out.sql[name]``, one SQLAlchemy engine per definition and worker.

An engine is made on first use, so a worker whose services never touch a database opens
no connection. ``SqlOutconn`` behaves as the ``Engine`` (``connect()``, ``begin()``,
``dialect``...) and adds ``session()``. A hot deploy that changes or removes a definition
retires the old engine: requests holding its connections finish on it, and it is disposed
of once they are all back in the pool.

Under gevent: psycopg 3 waits for its socket through its own wait functions, which use
``selectors``/``select``; gunicorn's gevent worker monkey-patches those, so a slow query
yields to the other greenlets of the worker (``tests/integration/test_sql.py`` proves it
with ``pg_sleep`` while ``/esb/ping`` answers). sqlite3 is a C library that does not yield:
keep SQLite queries short, it is meant for tests and small setups.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import gevent
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import TimeoutError as PoolTimeout

from esb.bus import parse_iso
from esb.bus.heartbeat import rows_of
from esb.config.definitions import SqlOutconnDef
from esb.config.secrets import masked_url
from esb.errors import PoolExhausted

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)

__all__ = [
    "HEARTBEAT_FIELD",
    "SqlOutconn",
    "SqlPoolExhausted",
    "check_all",
    "heartbeat_field",
    "mask_url",
    "merge_facts",
    "refresh",
    "sql_status",
]

RETIRE_POLL_S = 0.5
PING_S = 5.0  # how often a worker checks that each database it uses answers
#: The heartbeat field under which a worker publishes its engines' facts.
HEARTBEAT_FIELD = "outconns_sql"


class SqlPoolExhausted(PoolExhausted, PoolTimeout):
    """Every connection of an outconn's pool stayed busy: PoolExhausted (a 503 naming the
    outconn), and still the TimeoutError SQLAlchemy raises, so code that catches that or
    any SQLAlchemyError (a notification run) goes on catching it."""


#: The name this module gave ``masked_url`` before masking had one home.
mask_url = masked_url


def engine_options(definition: SqlOutconnDef) -> dict[str, Any]:
    """create_engine keyword arguments for DEFINITION (pooling, timeouts, connect_args)."""
    url = make_url(definition.url)
    connect_args = dict(definition.connect_args)
    options: dict[str, Any] = {"pool_pre_ping": definition.pre_ping}
    if url.get_backend_name() == "sqlite":
        # SQLite's pool is per file and not sized; a worker's greenlets share connections.
        connect_args.setdefault("check_same_thread", False)
    else:
        options |= {
            "pool_size": definition.pool_size,
            "max_overflow": definition.max_overflow,
            "pool_timeout": definition.pool_timeout_s,
            "pool_recycle": int(definition.recycle_s),
        }
    if definition.statement_timeout_s is not None and url.get_backend_name() == "postgresql":
        timeout_ms = int(definition.statement_timeout_s * 1000)
        # The URL's own ?options=... (a search_path, say) are kept: connect_args would replace them.
        existing = connect_args.get("options") or url.query.get("options", "")
        if isinstance(existing, tuple):
            existing = " ".join(existing)
        connect_args["options"] = f"{existing} -c statement_timeout={timeout_ms}".strip()
    options["connect_args"] = connect_args
    return options


class SqlOutconn:
    """One outgoing SQL connection of one worker: the engine, made on first use."""

    def __init__(self, definition: SqlOutconnDef):
        self.definition = definition
        self.name = definition.name
        self.url = masked_url(definition.url)
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self.is_retired = False
        # The last ping (check()): None until the engine was used and checked once.
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.checked_at: float | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = create_engine(self.definition.url, **engine_options(self.definition))
                    logger.info("outconn.sql %s: engine made for %s", self.name, self.url)
        return self._engine

    def __getattr__(self, attr: str) -> Any:
        # dialect, execution_options(), dispose()...: the Engine's own.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.engine, attr)

    def connect(self) -> Connection:
        """A connection from the pool, as ``Engine.connect``; PoolExhausted (a 503 naming
        this outconn) when none came free within ``pool_timeout_s``."""
        try:
            return self.engine.connect()
        except PoolTimeout as exc:
            raise self._exhausted() from exc

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a transaction that commits when the block ends, as ``Engine.begin``."""
        with self.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def session(self, **kwargs: Any) -> Iterator[Session]:
        """An ORM Session that commits when the block ends and rolls back when it raises.

        sqlalchemy.orm is imported here, by the first service that asks for a session: a
        worker whose services use Core only (or no database) never holds it (5.6 MB).
        """
        from sqlalchemy.orm import Session

        with Session(self.engine, **kwargs) as session:
            try:
                yield session
                session.commit()
            except PoolTimeout as exc:  # the session takes its connection at its first query
                session.rollback()
                if isinstance(exc, PoolExhausted):
                    raise  # another outconn's, named already
                raise self._exhausted() from exc
            except BaseException:
                session.rollback()
                raise

    def _exhausted(self) -> SqlPoolExhausted:
        """Every connection busy: the database may be fine, this pool is too small or held."""
        d = self.definition
        return SqlPoolExhausted(self.name, f"pool exhausted: all {d.pool_size + d.max_overflow} connections "
                                        f"(pool_size {d.pool_size}, max_overflow {d.max_overflow}) "
                                        f"stayed busy for {d.pool_timeout_s:g} s")

    def check(self) -> None:
        """Ping the database (SELECT 1) if a service used this engine; for status, in the
        background, never on a request's path."""
        if self._engine is None or self.is_retired:
            return
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except PoolTimeout:
            return  # every connection busy: that says nothing of whether the database answers
        except Exception as exc:
            orig = getattr(exc, "orig", None)
            message = str(orig if orig is not None else exc).strip().splitlines()
            self.reachable = False
            self.last_error = (message[0] if message else type(exc).__name__)[:300]
        else:
            self.reachable = True
        self.checked_at = time.time()

    def facts(self) -> dict[str, Any]:
        """Pool facts for status: size, connections checked out, the last ping's answer."""
        pool = self._engine.pool if self._engine is not None else None
        checked_out = getattr(pool, "checkedout", lambda: 0)() if pool is not None else 0
        return {"name": self.name, "url": self.url, "pool_size": self.definition.pool_size,
                "checked_out": checked_out, "engine_made": self._engine is not None,
                "reachable": self.reachable, "last_error": self.last_error, "checked_at": self.checked_at}

    def retire(self, *, wait: bool = True) -> None:
        """Dispose of the engine once every connection a request holds is back (in the
        background); with WAIT False at once (the worker is stopping)."""
        self.is_retired = True
        if self._engine is None:
            return
        if not wait:
            self._engine.dispose()
            return
        gevent.spawn(self._dispose_when_idle)

    def _dispose_when_idle(self) -> None:
        engine = self._engine
        if engine is None:
            return
        checkedout = getattr(engine.pool, "checkedout", lambda: 0)
        while checkedout() > 0:
            gevent.sleep(RETIRE_POLL_S)
        engine.dispose()
        logger.info("outconn.sql %s: old engine disposed of", self.name)


def refresh(
    current: Mapping[str, SqlOutconn], definitions: Mapping[str, SqlOutconnDef]
) -> dict[str, SqlOutconn]:
    """The table for DEFINITIONS: unchanged definitions keep their engine; changed or
    removed ones are retired once their connections come back."""
    table: dict[str, SqlOutconn] = {}
    for name, definition in definitions.items():
        old = current.get(name)
        table[name] = old if old is not None and old.definition == definition else SqlOutconn(definition)
    for name, old in current.items():
        if table.get(name) is not old:
            logger.info("outconn.sql %s: definition replaced or removed; its engine is disposed of "
                        "once its connections are back", name)
            old.retire()
    return table


def check_all(table: Mapping[str, SqlOutconn]) -> None:
    """Ping every engine of TABLE that was used (see ``SqlOutconn.check``)."""
    for outconn in list(table.values()):
        outconn.check()


def heartbeat_field(table: Mapping[str, SqlOutconn]) -> dict[str, str]:
    """This worker's engines' facts, as one heartbeat hash field."""
    return {HEARTBEAT_FIELD: json.dumps([outconn.facts() for outconn in table.values()])}


def merge_facts(workers: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per outgoing SQL connection, the facts of every live worker: connections checked out
    summed, reachable when every worker that pinged it reached it, the last error seen."""
    merged: dict[str, dict[str, Any]] = {}
    for pid, row in rows_of(workers, HEARTBEAT_FIELD):
        into = merged.setdefault(row["name"], {
            "name": row["name"], "url": row["url"], "pool_size": row["pool_size"], "checked_out": 0,
            "reachable": None, "last_error": None, "workers": [],
        })
        into["checked_out"] += row.get("checked_out", 0)
        if row.get("reachable") is not None:
            into["reachable"] = bool(row["reachable"]) and into["reachable"] is not False
        if row.get("last_error") and row.get("reachable") is False:
            into["last_error"] = row["last_error"]
        into["workers"].append({"pid": pid, **row})
    return sorted(merged.values(), key=lambda row: row["name"])


def sql_status(client: Any, keys: Any, stale_after_s: float, now: Any) -> list[dict[str, Any]]:
    """The outgoing SQL connections of every live worker, from its heartbeat. Raises RedisError."""
    names = sorted(client.scan_iter(match=keys.worker_heartbeat_pattern, count=500))
    live = []
    if names:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, "pid", "last_heartbeat", HEARTBEAT_FIELD)
        for pid, last_heartbeat, facts in pipe.execute():
            moment = parse_iso(last_heartbeat)
            if moment is None or (now - moment).total_seconds() >= stale_after_s:
                continue
            live.append({"pid": pid or "0", HEARTBEAT_FIELD: facts or "[]"})
    return merge_facts(live)
