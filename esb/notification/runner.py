"""One run of an SQL notification, in the worker that took its firing.

Watermark mode reads a batch at a time with esb's own keyset query (``keyset``)::

    SELECT * FROM (<query>) AS esb_q WHERE (a, b) > (:a, :b) ORDER BY a, b LIMIT :n

so no cursor stays open while the service runs, rows sharing a timestamp are neither
skipped nor repeated, and the watermark (ODB) moves only past a batch whose service call
succeeded. A batch never ends inside a run of equal watermark values (the run goes whole
into one call, or the run fails saying it cannot), rows with a NULL watermark value fail
the run naming them, and a watermark stored for another query or other columns is gone on
from only as the definition's ``on_change`` says. Plain mode streams the query's rows
(``stream_results``) and hands them over in batches. A run reads at most ``max_rows``; a
full page goes on with the next one while the run's time budget lasts. Delivery is at
least once: a worker killed between a service call and the watermark's commit delivers
that batch again.

A run claims its notification at the start and checks that it still holds it before each
service call; its writes are conditional on holding it (``store.Superseded``). So when a
stopped or hung worker's firing was reclaimed and run elsewhere, the late run, once it
goes on, commits nothing and calls nothing more: the watermark never moves backwards and
two runs never deliver side by side (only the call it was stopped in completes).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.exc import SQLAlchemyError

from esb.bus import Keys, utc_now_iso
from esb.config.definitions import SqlNotificationDef
from esb.errors import (
    BadInput,
    OdbUnavailable,
    ServiceFailed,
    ServiceNotFound,
    Unavailable,
    WatermarkProblem,
)
from esb.notification.keyset import (
    NULL_SAMPLE,
    group_problem,
    group_query,
    identity,
    nulls_problem,
    nulls_query,
    on_stored,
    refusal,
    watermark_query,
    wrapped,
)
from esb.notification.store import (
    NotificationRun,
    NotificationStore,
    State,
    Superseded,
    jsonable,
    row_key,
    shown_row,
)
from esb.observe import metrics
from esb.observe.retry import Retrying

logger = logging.getLogger(__name__)

# esb.outgoing.sql.SqlOutconn: an Engine (connect(), begin()). Named, not imported:
# notifications sit below outgoing and the scheduler in the layers (docs/architecture.md).
SqlOutconn = Any

UTC = dt.UTC
RUN_BUDGET_S = 30.0  # how long one run may go on with further full pages
BACKOFF_MAX_S = 60.0


def backoff_s(interval_s: float, consecutive_failures: int) -> float:
    """Seconds to leave out after CONSECUTIVE_FAILURES failed runs: none after the first,
    then one interval, then two (at most BACKOFF_MAX_S), so a failing database is asked
    less often while a run still completes before the notification counts as stale."""
    if consecutive_failures < 2:
        return 0.0
    return min(interval_s * min(2 ** (consecutive_failures - 2), 2), BACKOFF_MAX_S)


def service_failures() -> tuple[type[BaseException], ...]:
    """What a service call raises when the service failed. gevent's Timeout passes through
    ``ServiceRuntime.run`` (it belongs to whoever started it); a notification run starts
    none, so one that reaches the runner escaped the service. Imported on use: only a
    worker makes calls, and the status CLI, which imports this module, loads no gevent."""
    from gevent.timeout import Timeout

    return (ServiceFailed, ServiceNotFound, BadInput, Unavailable, Timeout)


class BatchFailed(Exception):
    """The service failed on a batch that is to be retried in a later run."""


def db_message(exc: BaseException) -> str:
    """The database's own words for EXC, without SQLAlchemy's wrapping and SQL echo."""
    orig = getattr(exc, "orig", None)
    message = str(orig) if orig is not None else str(exc)
    return message.strip().splitlines()[0][:500] if message.strip() else type(exc).__name__


def result_columns(connection: Any, definition: SqlNotificationDef) -> list[str]:
    """The names of the columns DEFINITION's query answers, asked of the database on
    CONNECTION without reading a row: ``esb check-config`` checks the watermark with them."""
    statement = text(f"{wrapped(definition)} WHERE 1 = 0")
    result = connection.execute(statement, dict(definition.params))
    try:
        return list(result.keys())
    finally:
        result.close()


def missing_columns(definition: SqlNotificationDef, columns: Collection[str]) -> list[str]:
    """DEFINITION's watermark columns that are not among the query's result COLUMNS."""
    return [column for column in definition.watermark if column not in columns]


class NotificationRunner:
    """Runs notifications for one worker; facts go to Redis (status), runs to the ODB."""

    def __init__(
        self,
        *,
        store: NotificationStore,
        call: Callable[..., Any],
        outconns: Callable[[], Mapping[str, SqlOutconn]],
        definitions: Callable[[], Mapping[str, SqlNotificationDef]],
        client: Any,
        keys: Keys,
        host: str,
        pid: int,
    ):
        self.store = store
        self.call = call  # ServiceRuntime.run
        self.outconns = outconns
        self.definitions = definitions
        self.client = client
        self.keys = keys
        self.host = host
        self.pid = pid
        self._retrying: dict[str, Retrying] = {}
        self._db_errors: dict[str, str] = {}  # the database's last message, per notification
        self._problems: dict[str, str] = {}  # the last WatermarkProblem, per notification

    # -- one run -------------------------------------------------------------------------

    def run(self, name: str) -> str | None:
        """Run notification NAME once; answers the error that failed the run, or None.

        Whatever a run raises ends it as a failed run, in status and server.log: an
        exception left to the dispatch consumer would end its greenlet, and the firing
        would stay in flight (no run of the notification for ``inflight_ttl_s``).
        """
        try:
            return self._run(name)
        except BaseException as exc:
            if not isinstance(exc, (Exception, *service_failures())):
                raise  # GreenletExit: the worker is stopping
            error = f"{type(exc).__name__}: {exc}"[:500]
            logger.exception("notification %s: the run failed: %s", name, error)
            definition = self.definitions().get(name)
            if definition is not None:
                try:
                    self._finish(definition, "-", dt.datetime.now(UTC), 0.0, 0, None, "failed", error)
                except Exception:
                    logger.exception("notification %s: the failed run was not recorded", name)
            return error

    def _run(self, name: str) -> str | None:
        definition = self.definitions().get(name)
        if definition is None:
            logger.info("notification %s is no longer defined; firing ignored", name)
            return None
        if not definition.is_active:
            return None
        if self._backing_off(name):
            return None
        run_id = uuid.uuid4().hex[:12]
        state = self.store.claim(name, run_id)
        if state.paused:
            logger.debug("notification %s is paused; firing ignored", name)
            return None
        started_at = dt.datetime.now(UTC)
        started = time.monotonic()
        self._facts(name, {"last_host": self.host, "last_pid": str(self.pid), "running_since": utc_now_iso()})
        counts = {"rows": 0}
        error: str | None = None
        outcome = "ok"
        retrying = self._retrying.setdefault(
            name, Retrying(logger, f"notification {name}", service="database")
        )
        try:
            outconn = self.outconns().get(definition.outconn)
            if outconn is None:
                raise LookupError(f"no outconn.sql named {definition.outconn!r} on this worker")
            self._redeliver(definition, outconn, run_id, counts)
            if definition.watermark:
                watermark = self._starting_watermark(definition, run_id, state)
                self._run_watermark(definition, outconn, run_id, watermark, counts)
            else:
                self._run_plain(definition, outconn, run_id, counts)
            retrying.succeeded()
            self._db_errors.pop(name, None)
            self._problems.pop(name, None)
        except BatchFailed as exc:
            outcome, error = "failed", str(exc)
            retrying.succeeded()  # the database answered; the service failed
        except Superseded as exc:
            # Not a failure of the notification: the run that overtook this one goes on.
            logger.warning("notification %s: %s", name, exc)
            self._record(name, run_id, started_at, time.monotonic() - started, counts["rows"],
                         state.watermark_text, "superseded", str(exc))
            return None
        except WatermarkProblem as exc:
            outcome, error = "failed", str(exc)
            retrying.succeeded()  # the database answered; its rows cannot be gone through
            if self._problems.get(name) != error:  # logged once per change, not every run
                logger.error("notification %s run %s failed: %s", name, run_id, error)
            self._problems[name] = error
        except SQLAlchemyError as exc:
            outcome, error = "failed", db_message(exc)
            if self._db_errors.get(name) != error:
                retrying.failures = 0  # a new kind of failure is logged again
            self._db_errors[name] = error
            retrying.failed(exc)
        except (OdbUnavailable, LookupError) as exc:
            outcome, error = "failed", str(exc)[:500]
            logger.error("notification %s run %s failed: %s", name, run_id, error)
        except Exception as exc:  # a driver that does not load, a value a step cannot take...
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"[:500]
            logger.exception("notification %s run %s failed: %s", name, run_id, error)
        duration_s = time.monotonic() - started
        metrics.observe_notification(name, outcome, counts["rows"], duration_s, time.time())
        self._finish(definition, run_id, started_at, duration_s, counts["rows"], state.watermark_text,
                     outcome, error)
        return None if outcome == "ok" else error

    def _starting_watermark(self, definition: SqlNotificationDef, run_id: str,
                            state: State) -> list[Any] | None:
        """The watermark this run goes on from: the stored one when it is this definition's;
        otherwise as ``on_change`` says (WatermarkProblem when nothing says)."""
        name, stored = definition.name, state.watermark
        if stored is not None and any(value is None for value in stored):
            raise WatermarkProblem(
                f"the stored watermark {jsonable(stored)} holds a NULL (an older esb stored it) and "
                f"bounds no row: set it with 'esb notifications DIR reset {name} [--to VALUE]'")
        action, change = on_stored(definition, state.watermark_of, stored)
        if action == "same":
            return stored
        if action == "refuse":
            raise WatermarkProblem(
                f"{refusal(definition, change, stored)}. Set on_change = \"reset\" or \"keep\" and "
                f"deploy again, or set it with 'esb notifications DIR reset {name} [--to VALUE]'")
        self.store.rebase(name, run_id, identity(definition), reset=action == "reset")
        if action == "adopt":
            return stored
        logger.warning("notification %s: %s; on_change = %s: %s", name, change, action,
                       "starting from the first row" if action == "reset" else f"going on from {stored}")
        return None if action == "reset" else stored

    def _run_watermark(self, definition: SqlNotificationDef, outconn: SqlOutconn, run_id: str,
                       watermark: list[Any] | None, counts: dict[str, int]) -> None:
        deadline = time.monotonic() + max(RUN_BUDGET_S, definition.interval_s)
        delivered_any = False
        more = True
        while more:
            page = 0
            while more and page < definition.max_rows:
                limit = min(definition.batch_size, definition.max_rows - page)
                rows, more = self._next_batch(definition, outconn, watermark, limit)
                if not rows:
                    break
                last = [rows[-1][column] for column in definition.watermark]
                self._deliver(definition, outconn, run_id, rows, after=last)
                delivered_any = True
                watermark = last
                page += len(rows)
                counts["rows"] += len(rows)
            if time.monotonic() > deadline:
                break
        if not delivered_any and definition.call_when_empty:
            self._deliver(definition, outconn, run_id, [], after=None)
        self._check_nulls(definition, outconn)

    def _next_batch(self, definition: SqlNotificationDef, outconn: SqlOutconn,
                    watermark: list[Any] | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """The next batch past WATERMARK (at most LIMIT rows) and whether rows follow it.

        One row more than LIMIT is read to see where the batch ends: never inside a run of
        equal watermark values, since the watermark moves past the whole run. The batch
        ends before the run; a run that fills the batch goes whole into it (at most
        max_rows; more fail the run, WatermarkProblem)."""
        params = dict(definition.params)
        if watermark is not None:
            params |= {f"esb_wm_{i}": value for i, value in enumerate(watermark)}
        if definition.lag_s > 0:
            params["esb_lag_until"] = dt.datetime.now(UTC) - dt.timedelta(seconds=definition.lag_s)
        params["esb_limit"] = limit + 1
        bound = 0 if watermark is None else len(watermark)
        rows = self._read(definition, outconn, watermark_query(definition, bound, outconn.dialect), params)
        if len(rows) <= limit:
            return rows, False
        columns = definition.watermark
        following = [rows[limit][column] for column in columns]
        rows = rows[:limit]
        start = len(rows)
        while start > 0 and [rows[start - 1][column] for column in columns] == following:
            start -= 1
        if start > 0:
            return rows[:start], True
        params = dict(definition.params) | {f"esb_wm_{i}": v for i, v in enumerate(following)}
        params["esb_limit"] = definition.max_rows + 1
        group = self._read(definition, outconn, group_query(definition, outconn.dialect), params)
        if len(group) > definition.max_rows:
            raise WatermarkProblem(group_problem(definition, following))
        return group, True

    @staticmethod
    def _read(definition: SqlNotificationDef, outconn: SqlOutconn, statement: str,
              params: dict[str, Any]) -> list[dict[str, Any]]:
        with outconn.connect() as conn:
            result = conn.execute(text(statement), params)
            rows = [dict(row._mapping) for row in result]
        missing = missing_columns(definition, rows[0]) if rows else []
        if missing:
            raise LookupError(f"watermark column(s) {', '.join(missing)} missing from the query's result")
        return rows

    @staticmethod
    def _check_nulls(definition: SqlNotificationDef, outconn: SqlOutconn) -> None:
        """Rows with a NULL in a watermark column are in no batch: a run that finds some
        fails naming them, so that they are never left behind unseen."""
        params = dict(definition.params)
        with outconn.connect() as conn:
            sample = [dict(row._mapping) for row in conn.execute(
                text(nulls_query(definition, outconn.dialect)), params | {"esb_limit": NULL_SAMPLE})]
            if not sample:
                return
            count = conn.execute(text(nulls_query(definition, outconn.dialect, count=True)), params).scalar()
        raise WatermarkProblem(nulls_problem(definition, sample, int(count or len(sample))))

    def _run_plain(self, definition: SqlNotificationDef, outconn: SqlOutconn, run_id: str,
                   counts: dict[str, int]) -> None:
        # Further pages only when esb marks what it delivered (after_success): otherwise
        # the same rows would come back within the run.
        deadline = time.monotonic() + max(RUN_BUDGET_S, definition.interval_s)
        delivered_any = False
        # PERF(esb): one read per run. The rows of dead letters, which the query offers
        # again while nothing marks them, are left out: a batch is dead-lettered once.
        dead_keys = self.store.dead_row_keys(definition.name)
        while True:
            page = 0
            # after_success runs once the page's cursor is closed: SQLite lets no writer
            # commit while a reader's cursor is open (at least once all the same).
            marks: list[list[dict[str, Any]]] = []
            try:
                with outconn.connect() as conn:
                    result = conn.execution_options(
                        stream_results=True, yield_per=definition.batch_size
                    ).execute(text(definition.query), dict(definition.params))
                    try:
                        for partition in result.partitions(definition.batch_size):
                            rows = [dict(row._mapping) for row in partition][: definition.max_rows - page]
                            page += len(rows)
                            if dead_keys:
                                rows = [row for row in rows if row_key(shown_row(row)) not in dead_keys]
                            if rows:
                                self._deliver(definition, outconn, run_id, rows, after=None, marks=marks)
                                delivered_any = True
                                counts["rows"] += len(rows)
                            if page >= definition.max_rows:
                                break
                    finally:
                        result.close()
            finally:
                for rows in marks:
                    self._after_success(definition, outconn, rows)
            if page < definition.max_rows or not definition.after_success or time.monotonic() > deadline:
                break
        if not delivered_any and definition.call_when_empty:
            self._deliver(definition, outconn, run_id, [], after=None)

    def _deliver(self, definition: SqlNotificationDef, outconn: SqlOutconn, run_id: str,
                 rows: list[dict[str, Any]], *, after: list[Any] | None,
                 marks: list[list[dict[str, Any]]] | None = None) -> None:
        """One service call; on success after_success and the watermark. A failure raises
        BatchFailed, unless the batch reached max_attempts: then it is dead-lettered and
        the run goes on past it.

        With max_attempts the attempt is counted before the call, so a call that kills
        its worker (``os._exit``, a segfault, the OOM killer) has used it too: a batch
        whose attempts ran out without an outcome is dead-lettered without calling again."""
        name = definition.name
        shown = [shown_row(row) for row in rows]
        notification = {"name": name, "run_id": run_id, "mode": definition.mode}
        max_attempts = definition.max_attempts
        if max_attempts is None:
            # PERF(esb): one primary-key read in the ODB per service call (not per row); it
            # keeps a late run from calling the service beside the run that overtook it.
            if not self.store.holds(name, run_id):
                raise Superseded(name, run_id)
        else:
            attempts = self.store.count_attempt(name, run_id)  # fenced as holds() is
            if attempts > max_attempts:
                error = (f"the worker died during the service call of attempt {attempts - 1} "
                         "(killed, crashed or exited)")
                self._dead_letter(definition, outconn, run_id, rows, shown, error, attempts - 1, after, marks)
                return
        try:
            self.call(definition.service, {"rows": shown}, cid=f"{run_id}", notification=notification)
        except service_failures() as exc:
            error = getattr(exc, "error", None) or f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ServiceFailed):  # ServiceFailed was logged with its traceback
                logger.error("notification %s run %s: service %s failed: %s", name, run_id,
                             definition.service, error)
            if max_attempts is None:
                raise BatchFailed(f"service {definition.service} failed: {error}") from None
            if attempts >= max_attempts:
                self._dead_letter(definition, outconn, run_id, rows, shown, error, attempts, after, marks)
                return
            raise BatchFailed(f"service {definition.service} failed (attempt {attempts}): {error}") from None
        self._facts(name, {"progress_at": utc_now_iso()})
        if rows:
            self._mark(definition, outconn, rows, marks)
        if after is not None or max_attempts is not None:
            self.store.advance(name, after, run_id)

    def _dead_letter(self, definition: SqlNotificationDef, outconn: SqlOutconn, run_id: str,
                     rows: list[dict[str, Any]], shown: list[dict[str, Any]], error: str, attempts: int,
                     after: list[Any] | None, marks: list[list[dict[str, Any]]] | None) -> None:
        if rows:
            self._mark(definition, outconn, rows, marks)
        keys = None if definition.watermark else [row_key(row) for row in shown]
        self.store.give_up(definition.name, run_id, shown, error, attempts, after, keys)
        logger.error("notification %s: a batch of %d rows failed %d times and went to the dead "
                     "letters (%s); see 'esb notifications DIR failed'", definition.name,
                     len(rows), attempts, error)

    def _redeliver(self, definition: SqlNotificationDef, outconn: SqlOutconn, run_id: str,
                   counts: dict[str, int]) -> None:
        """Deliver the dead letters an operator asked to retry, once each, before new rows.
        A failure leaves the letter dead with the new error; the run goes on."""
        name = definition.name
        for letter in self.store.retries(name):
            if not self.store.take_retry(name, run_id, letter["id"], letter["attempts"]):
                continue
            rows = letter["rows"]
            notification = {"name": name, "run_id": run_id, "mode": definition.mode}
            try:
                self.call(definition.service, {"rows": rows}, cid=f"{run_id}", notification=notification)
            except service_failures() as exc:
                error = getattr(exc, "error", None) or f"{type(exc).__name__}: {exc}"
                self.store.retry_failed(letter["id"], error)
                logger.error("notification %s: dead letter %s failed again (%s)", name, letter["id"], error)
                continue
            if rows:
                self._after_success(definition, outconn, rows)
            self.store.redelivered(letter["id"])
            counts["rows"] += len(rows)
            logger.info("notification %s: dead letter %s delivered (%d rows)", name, letter["id"], len(rows))

    def _mark(self, definition: SqlNotificationDef, outconn: SqlOutconn, rows: list[dict[str, Any]],
              marks: list[list[dict[str, Any]]] | None) -> None:
        if marks is None:
            self._after_success(definition, outconn, rows)
        elif definition.after_success:
            marks.append(rows)

    @staticmethod
    def _after_success(
        definition: SqlNotificationDef, outconn: SqlOutconn, rows: list[dict[str, Any]]
    ) -> None:
        if not definition.after_success:
            return
        statement = text(definition.after_success)
        params = dict(definition.params)
        if ":ids" in definition.after_success:
            statement = statement.bindparams(bindparam("ids", expanding=True))
            params["ids"] = [row.get("id") for row in rows]
        with outconn.begin() as conn:
            conn.execute(statement, params)

    def _backing_off(self, name: str) -> bool:
        try:
            retry_after = float(self.client.hget(self.facts_key(name), "retry_after") or 0)
        except Exception:  # Redis answered the firing a moment ago; a miss here only runs it
            return False
        if time.time() < retry_after:
            logger.debug("notification %s backs off after failed runs; firing ignored", name)
            return True
        return False

    # -- facts ---------------------------------------------------------------------------

    def facts_key(self, name: str) -> str:
        return notification_key(self.keys, name)

    def _facts(self, name: str, fields: dict[str, str]) -> None:
        try:
            self.client.hset(self.facts_key(name), mapping=fields)
        except Exception as exc:  # facts are for status; a run does not fail on them
            logger.debug("notification %s facts not written (%s)", name, exc)

    def _record(self, name: str, run_id: str, started_at: dt.datetime, duration_s: float, rows: int,
                bound: str | None, outcome: str, error: str | None) -> None:
        try:
            self.store.record_run(NotificationRun(
                name=name, run_id=run_id, host=self.host, pid=self.pid, started_at=started_at,
                duration_s=duration_s, rows=rows, watermark=bound, outcome=outcome, error=error))
        except OdbUnavailable as exc:
            logger.warning("notification %s run %s not recorded in the ODB (%s)", name, run_id, exc)

    def _finish(self, definition: SqlNotificationDef, run_id: str, started_at: dt.datetime, duration_s: float,
                rows: int, bound: str | None, outcome: str, error: str | None) -> None:
        name = definition.name
        self._record(name, run_id, started_at, duration_s, rows, bound, outcome, error)
        try:
            watermark = self.store.state(name).watermark_text
        except Exception:  # the ODB down, a stored value that no longer reads: the bound it started from
            watermark = bound
        key = self.facts_key(name)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hincrby(key, "runs", 1)
            pipe.hincrby(key, "rows", rows)
            now = utc_now_iso()
            fields = {"last_run": now, "last_outcome": outcome, "last_run_id": run_id,
                      "last_duration_s": f"{duration_s:.3f}", "last_rows": str(rows),
                      "watermark": watermark or "", "running_since": ""}
            if outcome == "ok":
                fields |= {"last_success": now, "consecutive_failures": "0", "last_error": "",
                           "retry_after": "0"}
            else:
                pipe.hincrby(key, "failures", 1)
                pipe.hincrby(key, "consecutive_failures", 1)
                fields["last_error"] = error or ""
            pipe.hset(key, mapping=fields)
            replies = pipe.execute()
            if outcome != "ok":
                consecutive = int(replies[3])
                delay_s = backoff_s(definition.interval_s, consecutive)
                self.client.hset(key, "retry_after", f"{time.time() + delay_s:.3f}")
        except Exception as exc:
            logger.warning("notification %s facts not written (%s)", name, exc)


def notification_key(keys: Keys, name: str) -> str:
    """The Redis hash of one notification's facts (runs, rows, failures, last run...)."""
    return f"{keys.prefix}notification:{name}"
