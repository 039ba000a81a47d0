"""The keyset query esb wraps around a notification's own, and what ties a stored watermark
to the definition it was stored for.

For ``watermark = ["updated_at", "id"]`` a batch is read as::

    SELECT * FROM (
    <query>
    ) AS esb_q WHERE updated_at IS NOT NULL AND id IS NOT NULL
      AND (updated_at, id) > (:esb_wm_0, :esb_wm_1) ORDER BY updated_at, id LIMIT :esb_limit

The query sits on lines of its own, so a trailing ``-- comment`` cannot swallow esb's
closing parenthesis; column names are quoted by the database's dialect where they need it
(a reserved word, capitals). Rows with a NULL in a watermark column cannot be placed past a
watermark: they are left out of every batch, and a run that finds some fails naming them
(``nulls_problem``), so they are never skipped unseen and no NULL is ever stored.

A stored watermark carries its definition's identity (the watermark columns and a digest
of the query): deployed again over another query or other columns, the notification does
not go on from a position that means something else (``on_stored``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from esb.config.definitions import SqlNotificationDef
from esb.config.sqltext import statement_text
from esb.notification.store import jsonable

NULL_SAMPLE = 5  # rows named when a watermark column holds NULLs


def wrapped(definition: SqlNotificationDef, select: str = "*") -> str:
    """The user's query as the subquery ``esb_q``, on lines of its own."""
    return f"SELECT {select} FROM (\n{statement_text(definition.query)}\n) AS esb_q"


def quoted_columns(definition: SqlNotificationDef, dialect: Any) -> list[str]:
    """The watermark columns as DIALECT writes them (quoted where a bare name would not do)."""
    preparer = dialect.identifier_preparer
    return [preparer.quote(column) for column in definition.watermark]


def watermark_query(definition: SqlNotificationDef, bound: int, dialect: Any) -> str:
    """The next batch past a watermark of BOUND values (0: from the first row). A watermark of
    fewer values than columns (kept from a definition with fewer columns) bounds only the
    columns it has values for."""
    columns = quoted_columns(definition, dialect)
    conditions = [f"{column} IS NOT NULL" for column in columns]
    if bound == 1:
        conditions.append(f"{columns[0]} > :esb_wm_0")
    elif bound > 1:
        marks = ", ".join(f":esb_wm_{i}" for i in range(bound))
        conditions.append(f"({', '.join(columns[:bound])}) > ({marks})")
    if definition.lag_s > 0:
        conditions.append(f"{columns[0]} <= :esb_lag_until")
    return (f"{wrapped(definition)} WHERE {' AND '.join(conditions)} "
            f"ORDER BY {', '.join(columns)} LIMIT :esb_limit")


def group_query(definition: SqlNotificationDef, dialect: Any) -> str:
    """Every row whose watermark values equal :esb_wm_0... (at most :esb_limit)."""
    columns = quoted_columns(definition, dialect)
    conditions = " AND ".join(f"{column} = :esb_wm_{i}" for i, column in enumerate(columns))
    return f"{wrapped(definition)} WHERE {conditions} LIMIT :esb_limit"


def nulls_query(definition: SqlNotificationDef, dialect: Any, *, count: bool = False) -> str:
    """Rows with a NULL in a watermark column (at most :esb_limit), or how many there are."""
    condition = " OR ".join(f"{column} IS NULL" for column in quoted_columns(definition, dialect))
    if count:
        return f"{wrapped(definition, 'count(*)')} WHERE {condition}"
    return f"{wrapped(definition)} WHERE {condition} LIMIT :esb_limit"


def _shown(value: Any) -> str:
    return "NULL" if value is None else json.dumps(jsonable(value), default=str)


def _row_key(definition: SqlNotificationDef, row: Mapping[str, Any]) -> str:
    names = ["id"] if "id" in row else list(definition.watermark)
    return " ".join(f"{name}={_shown(row.get(name))}" for name in names)


def nulls_problem(definition: SqlNotificationDef, sample: Sequence[Mapping[str, Any]], count: int) -> str:
    """What a run says when COUNT rows (SAMPLE of them) hold a NULL in a watermark column."""
    columns = [c for c in definition.watermark if any(row.get(c) is None for row in sample)]
    keys = ", ".join(_row_key(definition, row) for row in sample) + (", ..." if count > len(sample) else "")
    plural = len(columns) > 1
    named = f"watermark column{'s' if plural else ''} {', '.join(columns)} {'are' if plural else 'is'}"
    return (f"{named} NULL in {count} row{'s' if count != 1 else ''} "
            f"of the query's result ({keys}): esb cannot place them past the watermark and does not "
            "deliver them; give them a value, or leave them out in the query "
            f"(WHERE {columns[0] if columns else '...'} IS NOT NULL)")


def group_problem(definition: SqlNotificationDef, values: Sequence[Any]) -> str:
    """What a run says when more than max_rows rows share one watermark value."""
    return (f"more than {definition.max_rows} rows share the watermark value "
            f"[{', '.join(_shown(v) for v in values)}] ({', '.join(definition.watermark)}): "
            "rows with equal watermark values go to the service in one call, so that none is "
            f"skipped at a batch's end, and max_rows = {definition.max_rows} cannot hold them; "
            "make the watermark unique (add the primary key to its columns) or raise max_rows")


# -- the stored watermark's identity -----------------------------------------------------


@lru_cache(maxsize=256)
def _identity(query: str, columns: tuple[str, ...]) -> str:
    normalized = " ".join(statement_text(query).split())
    digest = hashlib.sha256(normalized.encode()).hexdigest()[:16]
    return json.dumps({"columns": list(columns), "query": digest})


def identity(definition: SqlNotificationDef) -> str:
    """What a stored watermark is a position in: the watermark columns and the query
    (blanks aside). Interval, batch sizes and the service may change freely."""
    return _identity(definition.query, tuple(definition.watermark))


def _stored_columns(stored: str) -> list[str] | None:
    try:
        columns = json.loads(stored).get("columns")
    except (ValueError, AttributeError):
        return None
    return columns if isinstance(columns, list) else None


def on_stored(definition: SqlNotificationDef, stored: str | None,
              watermark: Sequence[Any] | None) -> tuple[str, str | None]:
    """What a run does with the watermark stored for DEFINITION's name, as (action, change):

    - ``same``: stored for this definition; go on from it;
    - ``adopt``: nothing to protect (no watermark yet, or stored by an esb that kept no
      identity): go on from it and store this definition's identity;
    - ``reset`` or ``keep``: stored for another query or other columns (CHANGE says how),
      and ``on_change`` says what to do; keeping needs the same columns, or the stored ones
      first among the new (a position in fewer columns still bounds those);
    - ``refuse``: stored for another definition and nothing says what to do.
    """
    current = identity(definition)
    if stored == current:
        return "same", None
    if stored is None or watermark is None:
        return "adopt", None
    before = _stored_columns(stored)
    columns = list(definition.watermark)
    if before != columns:
        change = f"its watermark columns were {', '.join(before or ['(unknown)'])}, now {', '.join(columns)}"
    else:
        change = "it was stored for another query"
    if definition.on_change == "reset":
        return "reset", change
    if definition.on_change == "keep" and keeps_position(before, columns, watermark):
        return "keep", change
    return "refuse", change


def keeps_position(before: list[str] | None, columns: list[str], watermark: Sequence[Any]) -> bool:
    """Whether a watermark stored for the columns BEFORE is still a position for COLUMNS: the
    same columns, or those first among more (it then bounds those only)."""
    return before is not None and columns[: len(before)] == before and len(watermark) == len(before)


def refusal(definition: SqlNotificationDef, change: str | None, watermark: Sequence[Any] | None) -> str:
    """Why a stored watermark is not gone on from; the remedies follow (deploy or run)."""
    shown = "[" + ", ".join(_shown(v) for v in watermark or []) + "]"
    keep = ("" if definition.on_change != "keep" else
            "; on_change = \"keep\" cannot keep it: the stored columns must be the first of the new ones")
    return (f"notification {definition.name} has a stored watermark {shown} that is not this "
            f"definition's ({change}): going on from it could skip rows of this query{keep}")


def deploy_problem(definition: SqlNotificationDef, stored: str | None,
                   watermark: Sequence[Any] | None) -> tuple[str, str] | None:
    """(key, reason) when a deploy of DEFINITION must be refused over the stored watermark."""
    action, change = on_stored(definition, stored, watermark)
    if action != "refuse":
        return None
    key = "watermark" if change and change.startswith("its watermark columns") else "query"
    keep = ", or on_change = \"keep\" to go on from it,"
    if not keeps_position(_stored_columns(stored or ""), list(definition.watermark), watermark or []):
        keep = ""
    return key, (f"{refusal(definition, change, watermark)}. Set on_change = \"reset\" to start "
                 f"from the first row{keep} and deploy again")
