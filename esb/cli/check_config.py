"""`esb check-config DIR`: validate server.conf and config/*.toml without starting.

Beyond the files themselves, each watermarked SQL notification's query is described by its
database (its result's columns, not a row read) to find a watermark column the result
lacks. A database that cannot be asked (unreachable, a URL naming an unset variable, a
query it refuses) leaves that check undone with a warning saying why, not a failure:
the configuration may well be right for the database the server will see. A watermark the
ODB holds for another query or other columns of the same notification is an error, as it
is for ``esb start``.

The units the ODB holds (deployed earlier, by hand or by a peer) are checked too, except
those config/ deploys again at start: each must resolve in this shell's environment,
which is the one `esb start` from here gives the workers. An ODB that cannot be read
leaves that check undone with a warning.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from esb.cli.common import BAD_CONFIG, OK, load_or_exit
from esb.config import Definitions, ServerConfig, merge_units
from esb.config.definitions import SqlNotificationDef, SqlOutconnDef, resolve_env
from esb.deploy.stored import check_stored_units
from esb.errors import ConfigError, OdbUnavailable
from esb.notification.runner import db_message, missing_columns, result_columns
from esb.outgoing.sql import engine_options

CONNECT_TIMEOUT_S = 5


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check-config", help="validate server.conf and object definitions")
    p.add_argument("directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    for sentence in config.deprecations:
        print(f"esb: warning: {sentence}", file=sys.stderr)
    units = [
        (str(path.relative_to(config.directory)), path.read_text(encoding="utf-8"))
        for path in sorted(config.config_dir.glob("*.toml"))
    ]
    try:
        definitions = merge_units(units, environ=None)
        for warning in check_watermark_columns(definitions):
            print(f"esb: warning: {warning}", file=sys.stderr)
        for warning in check_stored_watermarks(definitions, config.odb_url):
            print(f"esb: warning: {warning}", file=sys.stderr)
    except ConfigError as exc:
        print(f"esb: {exc}", file=sys.stderr)
        return BAD_CONFIG
    unresolved = stored_unit_problems(config, frozenset(Path(name).name for name, _ in units))
    if unresolved:
        for sentence in unresolved:
            print(f"esb: unit stored in the ODB: {sentence}", file=sys.stderr)
        return BAD_CONFIG
    counts = ", ".join(f"{len(objs)} {kind}" for kind, objs in sorted(definitions.objects.items()))
    print(f"server.conf ok; {len(units)} definition files ok ({counts or 'no objects'})")
    return OK


def stored_unit_problems(config: ServerConfig, in_config_dir: frozenset[str]) -> list[str]:
    """The ODB's units that do not resolve here (see the module's docstring)."""
    from esb.odb import OdbStore

    odb_url = config.odb_url
    if odb_url.startswith("sqlite:///") and not Path(odb_url.removeprefix("sqlite:///")).exists():
        return []  # never started: nothing stored (and sqlite3 would make an empty file)
    odb = OdbStore(odb_url)
    try:
        return check_stored_units(odb, str(config.directory), skip=in_config_dir)
    except (OdbUnavailable, ConfigError) as exc:
        print(f"esb: warning: the ODB's units not checked: {exc}", file=sys.stderr)
        return []
    finally:
        odb.dispose()


def check_watermark_columns(definitions: Definitions) -> list[str]:
    """Raise ConfigError (file, key, reason) for a watermark column missing from its
    notification's result; answer a warning for each notification not checked, and why."""
    warnings = []
    for note in definitions.of("notification.sql").values():
        if not note.watermark:
            continue
        unit = definitions.unit_of[("notification.sql", note.name)]
        key = f"notification.sql.{note.name}.watermark"
        outconn = definitions.of("outconn.sql")[note.outconn]
        try:
            columns = _columns(outconn, note, unit)
        except (ConfigError, SQLAlchemyError, OSError) as exc:
            reason = db_message(exc) if isinstance(exc, SQLAlchemyError) else getattr(exc, "reason", str(exc))
            warnings.append(f"{unit}: {key}: column check not done: outconn.sql {outconn.name}: {reason}")
            continue
        missing = missing_columns(note, columns)
        if missing:
            raise ConfigError(unit, key, f"column(s) {', '.join(missing)} missing from the query's result "
                                         f"(it has {', '.join(columns) or 'no columns'})")
    return warnings


def check_stored_watermarks(definitions: Definitions, odb_url: str) -> list[str]:
    """Raise ConfigError for a notification whose watermark in the ODB was stored for another
    query or other columns, as ``esb start`` would refuse it; a warning when the ODB
    cannot be read."""
    notes = [note for note in definitions.of("notification.sql").values() if note.watermark]
    if not notes:
        return []
    from esb.notification.keyset import deploy_problem
    from esb.notification.store import NotificationStore

    url = make_url(odb_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or not Path(url.database).exists():
            return []  # no ODB yet (sqlite3 would make an empty file): nothing stored
        engine = create_engine(url)
    else:
        engine = create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        states = NotificationStore(engine).stored_watermarks()
    except OdbUnavailable as exc:
        return [f"stored watermarks not checked: {exc}"]
    finally:
        engine.dispose()
    for note in notes:
        state = states.get(note.name)
        problem = None if state is None else deploy_problem(note, state.watermark_of, state.watermark)
        if problem is not None:
            unit = definitions.unit_of[("notification.sql", note.name)]
            raise ConfigError(unit, f"notification.sql.{note.name}.{problem[0]}", problem[1])
    return []


def _columns(outconn: SqlOutconnDef, note: SqlNotificationDef, unit: str) -> list[str]:
    url = resolve_env(outconn.url, unit, f"outconn.sql.{outconn.name}.url", os.environ)
    parsed = make_url(url)
    options = engine_options(outconn)
    if parsed.get_backend_name() == "sqlite":
        # sqlite3 would make an empty file where none is: that is no database to describe.
        if parsed.database and parsed.database != ":memory:" and not Path(parsed.database).exists():
            raise OSError(f"no SQLite file {parsed.database}")
    elif parsed.get_backend_name() == "postgresql":
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, **options.get("connect_args", {})}
    engine = create_engine(url, **options)
    try:
        with engine.connect() as conn:
            return result_columns(conn, note)
    finally:
        engine.dispose()
