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

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import gevent
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from esb.config.definitions import SqlOutconnDef

logger = logging.getLogger(__name__)

__all__ = ["SqlOutconn", "mask_url", "refresh"]

RETIRE_POLL_S = 0.5


def mask_url(url: str) -> str:
    """URL with its password replaced by ***: the only form in which a URL is logged or shown."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL: show no part of it that may hold a secret
        return url.split("://", 1)[0] + "://***"


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
        self.url = mask_url(definition.url)
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self.is_retired = False

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = create_engine(self.definition.url, **engine_options(self.definition))
                    logger.info("outconn.sql %s: engine made for %s", self.name, self.url)
        return self._engine

    def __getattr__(self, attr: str) -> Any:
        # connect(), begin(), dialect, execution_options()...: the Engine's own.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.engine, attr)

    @contextmanager
    def session(self, **kwargs: Any) -> Iterator[Session]:
        """An ORM Session that commits when the block ends and rolls back when it raises."""
        with Session(self.engine, **kwargs) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def facts(self) -> dict[str, Any]:
        """Pool facts for status: size and connections checked out (none before first use)."""
        pool = self._engine.pool if self._engine is not None else None
        checked_out = getattr(pool, "checkedout", lambda: 0)() if pool is not None else 0
        return {"name": self.name, "url": self.url, "pool_size": self.definition.pool_size,
                "checked_out": checked_out, "engine_made": self._engine is not None}

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
