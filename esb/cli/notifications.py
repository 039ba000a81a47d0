"""`esb notifications DIR [--failed] [--json]`, `esb notifications DIR pause|resume|run NAME`,
`esb notifications DIR failed [NAME] | retry ID | drop ID` and
`esb notifications DIR reset NAME [--to VALUE]`.

Without an action: every SQL notification with its liveness (the rows of ``esb status``).
``failed`` (or ``--failed``): the batches given up on after ``max_attempts`` (the ODB's
dead letters), which keep ``esb status`` non-zero until each is retried (its notification's
next run delivers it once more) or dropped.
``pause``/``resume`` set the operator's pause in the ODB (and in the facts status reads);
a paused notification's firings end at once. ``run`` asks the active scheduler to fire it now.
``reset`` sets a watermark-mode notification's stored watermark: to VALUE (JSON, one value
per watermark column), or without ``--to`` back to its first row; the stored watermark then
belongs to the deployed definition.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from redis.exceptions import RedisError

from esb.bus import Keys, make_redis
from esb.cli.common import BAD_CONFIG, FAILURE, OK, load_or_exit, print_json
from esb.config import merge_units
from esb.config.definitions import SqlNotificationDef
from esb.errors import BusUnavailable, ConfigError, OdbUnavailable
from esb.notification import job_name
from esb.notification.keyset import identity
from esb.notification.runner import notification_key
from esb.notification.status import dead_letter_problems, notification_rows
from esb.notification.store import NotificationStore, encode_values, shown_values, typed_like
from esb.odb import UNIT, OdbStore
from esb.scheduler import request_run

DEAD_LETTER_ACTIONS = ("failed", "retry", "drop")
COLUMNS = ("name", "active", "mode", "last_run", "last_outcome", "runs", "rows", "failures",
           "consecutive_failures", "next_run", "stale", "dead_letters")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "notifications", help="list SQL notifications, their dead letters, or pause/resume/run one",
        description="Without an action, list every SQL notification with its last run and whether "
                    "it is stale or failing. 'failed [NAME]' (or --failed) lists the batches given "
                    "up on; 'retry ID' has the next run deliver one once more, 'drop ID' gives it up.",
    )
    p.add_argument("directory")
    p.add_argument("action", nargs="?", choices=["pause", "resume", "run", "reset", *DEAD_LETTER_ACTIONS])
    p.add_argument("name", nargs="?", help="the notification; for retry and drop the dead letter's id")
    p.add_argument("--to", metavar="VALUE",
                   help="reset: the watermark to go on past, as JSON with one value per watermark "
                        "column (as in '[\"2030-01-01T00:00:00\", 42]'); default: from the first row")
    p.add_argument("--failed", action="store_true", help="list the dead-lettered batches (as 'failed')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.action in DEAD_LETTER_ACTIONS or args.failed:
        return dead_letter_command(args)
    if args.action and not args.name:
        print(f"esb notifications: '{args.action}' needs a name: esb notifications DIR "
              f"{args.action} NAME", file=sys.stderr)
        return BAD_CONFIG
    config = load_or_exit(args.directory)
    client = make_redis(config.redis_url, socket_timeout_s=3.0, retries=1)
    keys = Keys(config.main.cluster)
    odb = OdbStore(config.odb_url)
    try:
        units = odb.current(UNIT)
        definitions = merge_units([(u.name, u.content) for u in units], environ=None)
        notes = definitions.of("notification.sql")
        if args.action and args.name not in notes:
            print(f"esb notifications: no notification named {args.name!r}", file=sys.stderr)
            return FAILURE
        store = NotificationStore(odb.engine)
        if args.action == "reset":
            return reset_watermark(store, client, keys, notes[args.name], args.to)
        if args.action in ("pause", "resume"):
            paused = args.action == "pause"
            store.set_paused(args.name, paused)
            client.hset(notification_key(keys, args.name), "paused", "1" if paused else "0")
            print(f"notification {args.name}: {'paused' if paused else 'resumed'}")
            return OK
        if args.action == "run":
            reply = request_run(client, keys, job_name(args.name))
            if reply.outcome == "dispatched":
                print(f"notification {args.name}: run {reply.firing_id} dispatched")
                return OK
            print(f"notification {args.name}: not run ({reply.outcome}): {reply.detail}", file=sys.stderr)
            return FAILURE
        rows = notification_rows(client, keys, definitions)
        dead_letter_problems(rows, store.dead_letter_counts())  # fills each row's dead_letters
    except (OdbUnavailable, ConfigError) as exc:
        print(f"esb notifications: cannot read the ODB: {exc}", file=sys.stderr)
        return FAILURE
    except (RedisError, BusUnavailable) as exc:
        print(f"esb notifications: Redis unreachable: {exc}", file=sys.stderr)
        return FAILURE
    finally:
        odb.dispose()
    if args.json:
        print_json(rows)
    else:
        print(render_table(rows))
    return OK


def dead_letter_command(args: argparse.Namespace) -> int:
    """``failed [NAME]`` lists the dead letters (of NAME); ``retry ID`` and ``drop ID``
    handle one. Only the ODB is asked: a worker's next run delivers a retried letter."""
    action = "failed" if args.failed and not args.action else args.action
    letter_id: int | None = None
    if action in ("retry", "drop"):
        try:
            letter_id = int(args.name or "")
        except ValueError:
            print(f"esb notifications: '{action}' needs the id of a dead letter (see 'esb notifications "
                  f"DIR failed'), not {args.name!r}", file=sys.stderr)
            return BAD_CONFIG
    config = load_or_exit(args.directory)
    odb = OdbStore(config.odb_url)
    try:
        store = NotificationStore(odb.engine)
        if action == "failed":
            dead = store.dead_letters(args.name)
            if args.json:
                print_json(dead)
            else:
                print(render_dead_letters(dead))
            return OK
        if action == "retry":
            name = store.ask_retry(letter_id)
            if name is None:
                print(f"esb notifications: no dead letter {letter_id}", file=sys.stderr)
                return FAILURE
            print(f"dead letter {letter_id} of notification {name}: its next run delivers it once more")
            return OK
        if not store.drop(letter_id):
            print(f"esb notifications: no dead letter {letter_id}", file=sys.stderr)
            return FAILURE
        print(f"dead letter {letter_id} dropped")
        return OK
    except (OdbUnavailable, ConfigError) as exc:
        print(f"esb notifications: cannot read the ODB: {exc}", file=sys.stderr)
        return FAILURE
    finally:
        odb.dispose()


def render_dead_letters(dead: list[dict[str, Any]]) -> str:
    if not dead:
        return "(no dead-lettered batches)"
    lines = ["ID  NOTIFICATION  WHEN  ROWS  ATTEMPTS  STATE  ERROR"]
    for item in dead:
        lines.append(f"{item['id']}  {item['name']}  {item['created_at']}  {item['row_count']} rows  "
                     f"{item['attempts']} attempts  {item['state']}  {item['error']}")
    return "\n".join(lines)


def reset_watermark(store: NotificationStore, client: Any, keys: Keys, definition: SqlNotificationDef,
                    to: str | None) -> int:
    """``reset NAME [--to VALUE]``: the stored watermark set, and what it was, printed. A run in
    progress commits nothing more; the next run goes on past the new value."""
    name, columns = definition.name, definition.watermark
    if not columns:
        print(f"esb notifications: {name} is in plain mode: it keeps no watermark to reset",
              file=sys.stderr)
        return FAILURE
    values = None
    if to is not None:
        problem, values = _watermark_value(to, columns)
        if problem:
            print(f"esb notifications: --to {to}: {problem}", file=sys.stderr)
            return FAILURE
        values = typed_like(values, store.state(name).watermark)
    before = store.reset(name, identity(definition), values)
    encoded = None if values is None else encode_values(values)
    try:
        client.hset(notification_key(keys, name), "watermark", encoded or "")
    except RedisError:
        pass  # status shows the ODB's value after the next run
    was = "none" if before.watermark is None else json.dumps(shown_values(before.watermark_text))
    now = "none" if encoded is None else json.dumps(shown_values(encoded))
    after = "the rows past it" if values else "every row of its query from the first"
    print(f"notification {name}: watermark reset from {was} to {now} ({', '.join(columns)}); "
          f"the next run delivers {after}")
    return OK


def _watermark_value(to: str, columns: tuple[str, ...]) -> tuple[str | None, list[Any]]:
    """(problem, values) of a --to VALUE for COLUMNS."""
    try:
        values = json.loads(to)
    except ValueError as exc:
        return f"not JSON ({exc})", []
    if not isinstance(values, list):
        values = [values]
    if len(values) != len(columns):
        return (f"needs {len(columns)} values, one per watermark column ({', '.join(columns)}); "
                f"got {len(values)}"), []
    if any(value is None or isinstance(value, dict | list) for value in values):
        return "each value must be a string, a number or a boolean (a watermark holds no NULL)", []
    return None, values


def render_table(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    header = [c.upper().replace("CONSECUTIVE_FAILURES", "IN A ROW").replace("_", " ") for c in COLUMNS]
    table = [header] + [[cell(row, c) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
    for row in rows:
        if row.get("last_error"):
            lines.append(f"{row['name']}: {row['last_error']}")
    if not rows:
        lines.append("(no notifications defined)")
    return "\n".join(lines)
