"""What SQL notifications keep in the ODB; the one module that owns these three tables.

- ``esb_notification_state``: per notification its watermark (the last delivered values of
  its watermark columns, never NULL) with the identity of the definition it belongs to
  (``watermark_of``: columns and query digest, see ``keyset.identity``), whether an
  operator paused it, how often the batch at its head failed in a row (for
  ``max_attempts``), and the run that holds it (``run_id``);
- ``esb_notification_run``: one row per run (start, duration, rows, bound watermark,
  outcome, error, host, pid);
- ``esb_notification_dead``: batches given up on after ``max_attempts``, with rows and error,
  until an operator handles them (``state``: ``dead``, ``retry`` asked, or ``dropped``).

An attempt at a batch is counted before its service call (``count_attempt``), so a call
that kills its worker has used one: after ``max_attempts`` the batch is dead-lettered
without another call. In plain mode the query offers a dead-lettered row again at every
run, so each dead letter keeps a key of each of its rows (``row_key``) and a run leaves
those rows out; a dropped letter keeps its keys, so its rows stay left out.

The run that holds a notification is the one that claimed it last (``claim``, at a run's
start). Every write a run makes (``advance``, ``count_attempt``, ``give_up``...) is one
statement conditional on still holding it, so a run that was overtaken (its worker hung or
was stopped, and the scheduler's firing was reclaimed and run elsewhere) commits nothing:
it gets ``Superseded`` at its next step, and the watermark never moves backwards.

Watermark values are stored as JSON with their type, so a datetime or a Decimal binds as
the same type in the next query.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import hashlib
import json
import uuid
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from esb.errors import OdbUnavailable, WatermarkProblem

UTC = dt.UTC
RUNS_KEPT = 1000  # per notification; older run rows are deleted as new ones come

# Core tables, not ORM classes, as in esb.odb.store: no process imports sqlalchemy.orm for them.
METADATA = MetaData()

notification_state = Table(
    "esb_notification_state",
    METADATA,
    Column("name", String(255), primary_key=True),
    Column("watermark", Text, nullable=True),
    Column("paused", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The run that claimed it last: the only one whose writes take effect.
    Column("run_id", String(32), nullable=True),
    Column("watermark_of", Text, nullable=True),
)
# Columns added after the first release: an older ODB gains them (ensure_schema).
ADDED_STATE_COLUMNS = {"run_id": "VARCHAR(32)", "watermark_of": "TEXT"}

notification_run = Table(
    "esb_notification_run",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, index=True),
    Column("run_id", String(32), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("duration_s", Float, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("watermark", Text, nullable=True),  # as bound at the start
    Column("outcome", String(16), nullable=False),
    Column("error", Text, nullable=True),
)

notification_dead = Table(
    "esb_notification_dead",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, index=True),
    Column("run_id", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("rows", Text, nullable=False),  # JSON list of the batch's rows
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    # dead, retry (an operator asked for one more delivery) or dropped (kept for row_keys).
    Column("state", String(16), nullable=False, default="dead", server_default="dead"),
    Column("row_keys", Text, nullable=True),  # plain mode: JSON list of row_key() of its rows
)

DEAD, RETRY, DROPPED = "dead", "retry", "dropped"
PENDING = (DEAD, RETRY)  # what still waits for an operator, or for its retry


class Superseded(Exception):
    """A later run claimed the notification: this run must stop without writing anything."""

    def __init__(self, name: str, run_id: str):
        super().__init__(f"run {run_id} of notification {name} was overtaken by a later run "
                         "(its worker was stopped or hung); it stopped without committing")


@dataclasses.dataclass(frozen=True)
class NotificationRun:
    """One run of a notification, as ``record_run`` stores it."""

    name: str
    run_id: str
    host: str
    pid: int
    started_at: dt.datetime
    duration_s: float
    rows: int
    watermark: str | None  # as bound at the start
    outcome: str
    error: str | None


# -- values ------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A column value as JSON can carry it: datetimes ISO, decimals and UUIDs as strings."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, list | tuple):  # an array column
        return [jsonable(item) for item in value]
    if isinstance(value, dict):  # a JSON column
        return {str(key): jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # a driver's own type (an inet address, a range...): its text


def shown_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the service gets it and the dead letters keep it: every value JSON-able."""
    return {key: jsonable(value) for key, value in row.items()}


def row_key(row: dict[str, Any]) -> str:
    """A key of a shown row's content: how plain mode knows a dead-lettered row again."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:32]


def encode_values(values: list[Any]) -> str:
    """Watermark values with their type, as stored."""
    tagged = []
    for value in values:
        if isinstance(value, dt.datetime):
            tagged.append({"t": "datetime", "v": value.isoformat()})
        elif isinstance(value, dt.date):
            tagged.append({"t": "date", "v": value.isoformat()})
        elif isinstance(value, decimal.Decimal):
            tagged.append({"t": "decimal", "v": str(value)})
        elif isinstance(value, uuid.UUID):
            tagged.append({"t": "uuid", "v": str(value)})
        else:
            tagged.append({"t": "json", "v": jsonable(value)})
    return json.dumps(tagged)


def decode_values(text: str | None) -> list[Any] | None:
    if not text:
        return None
    decoders = {
        "datetime": dt.datetime.fromisoformat,
        "date": dt.date.fromisoformat,
        "decimal": decimal.Decimal,
        "uuid": uuid.UUID,
        "json": lambda v: v,
    }
    return [decoders[item["t"]](item["v"]) for item in json.loads(text)]


def shown_values(text: str | None) -> list[Any] | None:
    """Watermark values as status shows them (JSON-able)."""
    values = decode_values(text)
    return None if values is None else [jsonable(v) for v in values]


def typed_like(values: list[Any], like: list[Any] | None) -> list[Any]:
    """VALUES (from JSON) with the types of the stored watermark LIKE where it has one, so
    that an operator's ``"2030-01-01T00:00:00"`` binds as the timestamp it replaces."""
    if not like or len(like) != len(values):
        return values
    typed = []
    for value, old in zip(values, like, strict=True):
        if isinstance(old, dt.datetime):
            value = dt.datetime.fromisoformat(str(value))
        elif isinstance(old, dt.date):
            value = dt.date.fromisoformat(str(value))
        elif isinstance(old, decimal.Decimal):
            value = decimal.Decimal(str(value))
        elif isinstance(old, uuid.UUID):
            value = uuid.UUID(str(value))
        typed.append(value)
    return typed


def _past_head(watermark: list[Any] | None) -> dict[str, Any]:
    """The state's new values once the batch at the head is done with (delivered or given up)."""
    values: dict[str, Any] = {"attempts": 0}
    if watermark is not None:
        if any(value is None for value in watermark):
            # A NULL bounds nothing: every later run would read no row.
            raise WatermarkProblem(f"a watermark with a NULL value is never stored: {jsonable(watermark)}")
        values["watermark"] = encode_values(watermark)
    return values


def _columns_of(engine: Engine, table: str) -> list[dict[str, Any]]:
    inspector = inspect(engine)
    return inspector.get_columns(table) if inspector.has_table(table) else []


@dataclasses.dataclass(frozen=True)
class State:
    watermark: list[Any] | None
    watermark_text: str | None
    paused: bool
    attempts: int
    watermark_of: str | None = None  # the identity of the definition it was stored for


def _state(row: Any) -> State:
    return State(decode_values(row.watermark), row.watermark, row.paused, row.attempts, row.watermark_of)


class NotificationStore:
    """Reads and writes notification state; every driver error leaves as OdbUnavailable."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._has_schema = False

    def ensure_schema(self) -> None:
        if self._has_schema:
            return
        for attempt in range(2):
            try:
                METADATA.create_all(self.engine)
                self._add_missing_columns()
                self._add_dead_letter_columns()
                break
            except SQLAlchemyError as exc:
                # Another process created the tables (or the column) between our check and ours.
                if attempt:
                    raise OdbUnavailable(f"cannot create the notification tables: {exc}") from exc
        self._has_schema = True

    def _add_missing_columns(self) -> None:
        """An ODB made by an older esb lacks the later columns: add them."""
        table = notification_state.name
        columns = {c["name"] for c in inspect(self.engine).get_columns(table)}
        for column, sql_type in ADDED_STATE_COLUMNS.items():
            if column not in columns:
                with self.engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))

    def _add_dead_letter_columns(self) -> None:
        """An ODB made before dead letters could be retried or dropped lacks their columns."""
        table = notification_dead.name
        columns = {c["name"] for c in inspect(self.engine).get_columns(table)}
        with self.engine.begin() as conn:
            if "state" not in columns:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN state VARCHAR(16) NOT NULL "
                                  "DEFAULT 'dead'"))
            if "row_keys" not in columns:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN row_keys TEXT"))

    def _connect(self) -> Connection:
        self.ensure_schema()
        return self.engine.connect()

    def _write_row(self, conn: Connection, name: str, **values: Any) -> None:
        """Set VALUES (and updated_at) on NAME's state row, made first when it has none."""
        values["updated_at"] = dt.datetime.now(UTC)
        where = notification_state.c.name == name
        if conn.scalar(select(notification_state.c.name).where(where)) is None:
            conn.execute(insert(notification_state).values(name=name, watermark=None, paused=False,
                                                           attempts=0, updated_at=values["updated_at"]))
        conn.execute(update(notification_state).where(where).values(**values))

    def state(self, name: str) -> State:
        try:
            with self._connect() as conn:
                query = select(notification_state).where(notification_state.c.name == name)
                row = conn.execute(query).first()
                if row is None:
                    return State(None, None, False, 0)
                return _state(row)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read notification {name}: {exc}") from exc

    def states(self) -> dict[str, State]:
        try:
            with self._connect() as conn:
                return {row.name: _state(row) for row in conn.execute(select(notification_state))}
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the notifications' state: {exc}") from exc

    def stored_watermarks(self) -> dict[str, State]:
        """Every notification's state, read without creating or changing a table (for
        ``esb check-config``): empty when the ODB holds none, or none with an identity."""
        try:
            if "watermark_of" not in {c["name"] for c in _columns_of(self.engine, notification_state.name)}:
                return {}
            with self.engine.connect() as conn:
                return {row.name: _state(row) for row in conn.execute(select(notification_state))}
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the notifications' state: {exc}") from exc

    def claim(self, name: str, run_id: str) -> State:
        """RUN_ID holds NAME from now on (the previous holder, if still running, was given up
        for dead by the scheduler); answers the state it starts from."""
        try:
            with self._connect() as conn, conn.begin():
                self._write_row(conn, name, run_id=run_id)
                row = conn.execute(select(notification_state).where(notification_state.c.name == name)).one()
                return _state(row)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot claim notification {name}: {exc}") from exc

    def holds(self, name: str, run_id: str) -> bool:
        """Whether RUN_ID still holds NAME (checked before each service call)."""
        state = notification_state.c
        try:
            with self._connect() as conn:
                return conn.scalar(select(state.run_id).where(state.name == name)) == run_id
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read notification {name}: {exc}") from exc

    @staticmethod
    def _held(conn: Connection, name: str, run_id: str, **values: Any) -> None:
        """One UPDATE of NAME's state, only while RUN_ID holds it; Superseded otherwise."""
        state = notification_state.c
        statement = (update(notification_state)
                     .where(state.name == name, state.run_id == run_id)
                     .values(updated_at=dt.datetime.now(UTC), **values))
        if conn.execute(statement).rowcount != 1:
            raise Superseded(name, run_id)

    def advance(self, name: str, watermark: list[Any] | None, run_id: str) -> None:
        """A batch of RUN_ID succeeded: the watermark moves past it (None: plain mode, no
        watermark) and the head's failure count starts again. Superseded if RUN_ID no
        longer holds NAME."""
        try:
            with self._connect() as conn, conn.begin():
                self._held(conn, name, run_id, **_past_head(watermark))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write notification {name}'s state: {exc}") from exc

    def rebase(self, name: str, run_id: str, identity: str, *, reset: bool) -> None:
        """The stored watermark is RUN_ID's definition's from now on (IDENTITY); RESET: it
        starts again from the first row. Superseded if RUN_ID no longer holds NAME."""
        values: dict[str, Any] = {"watermark_of": identity}
        if reset:
            values |= {"watermark": None, "attempts": 0}
        try:
            with self._connect() as conn, conn.begin():
                self._held(conn, name, run_id, **values)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write notification {name}'s state: {exc}") from exc

    def reset(self, name: str, identity: str, watermark: list[Any] | None) -> State:
        """An operator's reset: NAME goes on past WATERMARK (None: from the first row), as the
        definition of IDENTITY's. A run in progress no longer holds NAME, so it commits
        nothing more. Answers the state before."""
        values = _past_head(watermark) | {"watermark_of": identity, "run_id": None}
        if watermark is None:
            values["watermark"] = None
        try:
            with self._connect() as conn, conn.begin():
                where = notification_state.c.name == name
                row = conn.execute(select(notification_state).where(where)).first()
                self._write_row(conn, name, **values)
                return State(None, None, False, 0) if row is None else _state(row)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot reset notification {name}'s watermark: {exc}") from exc

    def count_attempt(self, name: str, run_id: str) -> int:
        """The batch at the head is about to be offered once more; answers how often it
        was, this time included. Counted before the call: one that kills its worker counts."""
        state = notification_state.c
        try:
            with self._connect() as conn, conn.begin():
                self._held(conn, name, run_id, attempts=state.attempts + 1)
                return conn.scalar(select(state.attempts).where(state.name == name))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot count notification {name}'s attempt: {exc}") from exc

    def give_up(self, name: str, run_id: str, rows: list[dict], error: str, attempts: int,
                watermark: list[Any] | None, row_keys: list[str] | None = None) -> None:
        """The dead-letter record and moving past the batch, in one transaction (only while
        RUN_ID holds NAME). ROW_KEYS: plain mode's keys of its rows, left out from now on."""
        try:
            with self._connect() as conn, conn.begin():
                self._held(conn, name, run_id, **_past_head(watermark))
                conn.execute(insert(notification_dead).values(
                    name=name, run_id=run_id, created_at=dt.datetime.now(UTC),
                    rows=json.dumps(rows, default=str), error=error[:2000], attempts=attempts, state=DEAD,
                    row_keys=None if row_keys is None else json.dumps(row_keys)))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot dead-letter notification {name}'s batch: {exc}") from exc

    # -- dead letters: what an operator handles, and the retries a run delivers -----------

    def dead_row_keys(self, name: str) -> set[str]:
        """The keys of every row NAME dead-lettered in plain mode (dropped ones included)."""
        dead = notification_dead.c
        try:
            with self._connect() as conn:
                query = select(dead.row_keys).where(dead.name == name, dead.row_keys.is_not(None))
                texts = conn.scalars(query)
                return {key for keys in texts for key in json.loads(keys)}
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read notification {name}'s dead letters: {exc}") from exc

    def dead_letter_counts(self) -> dict[str, int]:
        """Per notification, its dead letters not handled yet (for status)."""
        dead = notification_dead.c
        try:
            with self._connect() as conn:
                query = (select(dead.name, func.count()).where(dead.state.in_(PENDING)).group_by(dead.name))
                return {name: count for name, count in conn.execute(query)}
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the notifications' dead letters: {exc}") from exc

    def ask_retry(self, letter_id: int) -> str | None:
        """The next run of its notification delivers dead letter LETTER_ID once more;
        answers the notification's name, None when there is no such letter to retry."""
        dead = notification_dead.c
        try:
            with self._connect() as conn, conn.begin():
                name = conn.scalar(select(dead.name).where(dead.id == letter_id, dead.state.in_(PENDING)))
                if name is not None:
                    conn.execute(update(notification_dead).where(dead.id == letter_id).values(state=RETRY))
                return name
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot retry dead letter {letter_id}: {exc}") from exc

    def drop(self, letter_id: int) -> bool:
        """Give dead letter LETTER_ID up for good; False when there is no such letter. A
        plain-mode letter stays, as dropped, so that its rows are not offered again."""
        dead = notification_dead.c
        pending = (dead.id == letter_id) & dead.state.in_(PENDING)
        try:
            with self._connect() as conn, conn.begin():
                if conn.execute(delete(notification_dead).where(pending, dead.row_keys.is_(None))).rowcount:
                    return True
                dropped = update(notification_dead).where(pending).values(state=DROPPED)
                return conn.execute(dropped).rowcount == 1
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot drop dead letter {letter_id}: {exc}") from exc

    def retries(self, name: str) -> list[dict[str, Any]]:
        """NAME's dead letters an operator asked to retry, oldest first."""
        dead = notification_dead.c
        query = select(notification_dead).where(dead.name == name, dead.state == RETRY).order_by(dead.id)
        try:
            with self._connect() as conn:
                return [self._letter(r) for r in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read notification {name}'s dead letters: {exc}") from exc

    def take_retry(self, name: str, run_id: str, letter_id: int, attempts: int) -> bool:
        """RUN_ID is about to deliver dead letter LETTER_ID once more: it counts as an
        attempt and is dead again unless ``redelivered`` follows, so a call that kills its
        worker is not made again without an operator. False when it is no longer asked."""
        dead = notification_dead.c
        error = "the worker died during the retry's service call (killed, crashed or exited)"
        try:
            with self._connect() as conn, conn.begin():
                self._held(conn, name, run_id)
                taken = update(notification_dead).where(dead.id == letter_id, dead.state == RETRY)
                taken = taken.values(state=DEAD, attempts=attempts + 1, error=error)
                return conn.execute(taken).rowcount == 1
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot retry dead letter {letter_id}: {exc}") from exc

    def retry_failed(self, letter_id: int, error: str) -> None:
        dead = notification_dead.c
        try:
            with self._connect() as conn, conn.begin():
                conn.execute(update(notification_dead).where(dead.id == letter_id).values(error=error[:2000]))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot record dead letter {letter_id}'s retry: {exc}") from exc

    def redelivered(self, letter_id: int) -> None:
        """A retried dead letter's service call succeeded: it is done with."""
        try:
            with self._connect() as conn, conn.begin():
                conn.execute(delete(notification_dead).where(notification_dead.c.id == letter_id))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot remove dead letter {letter_id}: {exc}") from exc

    def set_paused(self, name: str, paused: bool) -> None:
        try:
            with self._connect() as conn, conn.begin():
                self._write_row(conn, name, paused=paused)
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot write notification {name}'s state: {exc}") from exc

    def record_run(self, run: NotificationRun) -> None:
        runs = notification_run.c
        try:
            with self._connect() as conn, conn.begin():
                conn.execute(insert(notification_run).values(**dataclasses.asdict(run)))
                older = select(runs.id).where(runs.name == run.name).order_by(runs.id.desc())
                stale = conn.scalars(older.offset(RUNS_KEPT).limit(100)).all()
                if stale:
                    conn.execute(delete(notification_run).where(runs.id.in_(stale)))
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot record notification {run.name}'s run: {exc}") from exc

    def runs(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        runs = notification_run.c
        try:
            with self._connect() as conn:
                rows = conn.execute(
                    select(notification_run).where(runs.name == name).order_by(runs.id.desc()).limit(limit)
                ).all()
                return [
                    {"run_id": r.run_id, "host": r.host, "pid": r.pid,
                     "started_at": r.started_at.isoformat(), "duration_s": r.duration_s,
                     "rows": r.rows, "watermark": shown_values(r.watermark), "outcome": r.outcome,
                     "error": r.error}
                    for r in rows
                ]
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read notification {name}'s runs: {exc}") from exc

    def dead_letters(self, name: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The dead letters not handled yet (retries asked included), newest first."""
        dead = notification_dead.c
        try:
            with self._connect() as conn:
                query = (select(notification_dead).where(dead.state.in_(PENDING))
                         .order_by(dead.id.desc()).limit(limit))
                if name is not None:
                    query = query.where(dead.name == name)
                return [self._letter(r) for r in conn.execute(query)]
        except SQLAlchemyError as exc:
            raise OdbUnavailable(f"cannot read the notifications' dead letters: {exc}") from exc

    @staticmethod
    def _letter(r: Any) -> dict[str, Any]:
        rows = json.loads(r.rows)
        return {"id": r.id, "name": r.name, "run_id": r.run_id, "created_at": r.created_at.isoformat(),
                "attempts": r.attempts, "error": r.error, "state": r.state, "row_count": len(rows),
                "rows": rows}
