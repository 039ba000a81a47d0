"""Object definitions: TOML units parsed into frozen *Def objects, validated all or nothing.

A unit is one TOML file, named after the file; deploying it again replaces exactly the
objects it defined. Errors name the file, the key (``channel.http[0].path``) and why.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esb.config.schedule import schedule_problem, trigger_problem
from esb.config.secrets import secret_field, url_field, url_problem
from esb.config.sqltext import wrapping_problem
from esb.errors import ConfigError

logger = logging.getLogger(__name__)

_ENV_REF = re.compile(r"\$ENV\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOML_POSITION = re.compile(r"at line (\d+)")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CID_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_.~\-/{}]*$")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class HttpChannelDef:
    name: str
    path: str
    service: str
    security: str | None = None
    data_format: str = "json"
    methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class BasicAuthDef:
    name: str
    username: str
    password: str = secret_field()
    realm: str = "esb"


@dataclass(frozen=True)
class ApiKeyDef:
    name: str
    header: str
    value: str = secret_field()


@dataclass(frozen=True)
class JobDef:
    name: str
    service: str
    type: str
    weeks: float = 0
    days: float = 0
    hours: float = 0
    minutes: float = 0
    seconds: float = 0
    cron: str | None = None
    timezone: str = "UTC"
    start_date: str | None = None
    end_date: str | None = None
    repeats: int | None = None
    payload: dict = field(default_factory=dict)
    misfire_grace_s: int | None = None
    coalesce: bool = True
    on_overlap: str = "skip"
    paused: bool = False

    @property
    def interval_s(self) -> float:
        return self.weeks * 604800 + self.days * 86400 + self.hours * 3600 + self.minutes * 60 + self.seconds


@dataclass(frozen=True)
class SqlOutconnDef:
    name: str
    url: str = url_field()  # the password may be $ENV{...}; shown masked everywhere
    pool_size: int = 5
    max_overflow: int = 0
    pool_timeout_s: float = 10.0
    recycle_s: float = 1800.0  # connections older than this are replaced (-1: never)
    pre_ping: bool = True
    connect_args: dict = secret_field(default_factory=dict)  # may hold a password: shown masked
    statement_timeout_s: float | None = None  # PostgreSQL: -c statement_timeout


@dataclass(frozen=True)
class SqlNotificationDef:
    name: str
    outconn: str
    query: str
    service: str
    interval_s: float = field(default=5.0, metadata={"old_name": "interval"})
    params: dict = field(default_factory=dict)
    max_rows: int = 1000  # rows one page reads at most; a full page goes on with the next
    batch_size: int = 100  # rows per service call
    is_active: bool = True
    # Columns of the query's result that order it; empty: plain mode.
    watermark: tuple[str, ...] = ()
    lag_s: float = 0.0  # watermark mode: leave out rows newer than now minus lag_s
    after_success: str | None = None  # run per delivered batch with :ids bound
    call_when_empty: bool = False
    max_attempts: int | None = None  # a batch failing this often goes to the dead letters
    # Watermark mode: what a stored watermark of another query or other columns means.
    on_change: str = "refuse"

    @property
    def mode(self) -> str:
        return "watermark" if self.watermark else "plain"


@dataclass(frozen=True)
class AmqpOutconnDef:
    name: str
    url: str = url_field()  # may hold a password: shown through masked() only
    exchange: str = ""
    routing_key: str = ""
    pool_size: int = 10
    acquire_timeout_s: float = 10.0
    heartbeat_s: float = 30.0
    confirms: bool = field(default=True, metadata={"old_name": "confirm_publish"})
    confirm_timeout_s: float = 30.0
    mandatory: bool = False
    blocked_timeout_s: float = 30.0
    # How long send() keeps retrying a broken or refused connection before AmqpUnreachable.
    retry_budget_s: float = 10.0
    # send_many: how many messages may be published and not yet confirmed at once.
    window: int = 1000
    # Default message properties; a send() may override each.
    delivery_mode: int = 2
    content_type: str | None = None
    priority: int | None = None
    expiration: str | None = None
    headers: dict = field(default_factory=dict)
    app_id: str | None = None


@dataclass(frozen=True)
class AmqpChannelDef:
    name: str
    queue: str
    service: str
    url: str | None = url_field(default=None)  # may hold a password: see masked()
    outconn: str | None = None  # or the url of this [[outconn.amqp]]
    prefetch: int = 100
    consumers_per_worker: int = 1
    data_format: str = "json"
    # A failing service's message comes back after retry_delay_s, at most max_deliveries
    # times in all; then it goes to dead_letter_exchange with the error in a header.
    max_deliveries: int = 5
    retry_delay_s: float = 5.0
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    # Declare the queue (durable) before consuming: "classic" or "quorum"; None declares nothing.
    declare: str | None = None


# Kind as written in TOML ("channel.http") -> the Def class it builds.
KINDS: dict[str, type] = {
    "channel.http": HttpChannelDef,
    "security.basic_auth": BasicAuthDef,
    "security.api_key": ApiKeyDef,
    "scheduler.job": JobDef,
    "outconn.sql": SqlOutconnDef,
    "notification.sql": SqlNotificationDef,
    "outconn.amqp": AmqpOutconnDef,
    "channel.amqp": AmqpChannelDef,
}


@dataclass(frozen=True)
class Definitions:
    """Every object of every unit, by kind and name, with the unit that defined each."""

    objects: Mapping[str, Mapping[str, Any]]
    unit_of: Mapping[tuple[str, str], str]

    def of(self, kind: str) -> Mapping[str, Any]:
        return self.objects.get(kind, {})

    @property
    def channels(self) -> Mapping[str, HttpChannelDef]:
        return self.of("channel.http")

    @property
    def jobs(self) -> Mapping[str, JobDef]:
        return self.of("scheduler.job")


def resolve_env(text: str, file: str, key: str, environ: Mapping[str, str]) -> str:
    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(file, key, f"environment variable {name} is not set")
        return environ[name]

    return _ENV_REF.sub(lookup, text)


def parse_unit(
    file: str,
    text: str,
    *,
    environ: Mapping[str, str] | None = None,
    check_triggers: bool = True,
) -> dict[str, list[Any]]:
    """Parse one TOML unit into {kind: [Def, ...]}; raises ConfigError with file, key, reason.

    With ``environ`` None, ``$ENV{...}`` references are checked for form but left unresolved
    (a deploying client may not share the server's environment). ``check_triggers`` False
    skips building each job's trigger (APScheduler): for readers of units that were checked
    on deploy and that build no trigger, such as the workers.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = _TOML_POSITION.search(str(exc))
        line = int(where.group(1)) if where else None
        raise ConfigError(file, None, f"invalid TOML: {exc}", line=line) from None

    result: dict[str, list[Any]] = {}
    for group, kinds in data.items():
        if not isinstance(kinds, dict):
            raise ConfigError(file, group, "unknown object kind")
        for kind_name, tables in kinds.items():
            kind = f"{group}.{kind_name}"
            if kind not in KINDS:
                known = ", ".join(KINDS)
                raise ConfigError(file, kind, f"unknown object kind (known: {known})")
            if not isinstance(tables, list):
                raise ConfigError(file, kind, f"must be an array of tables: [[{kind}]]")
            for index, table in enumerate(tables):
                where = f"{kind}[{index}]"
                obj = _build(KINDS[kind], table, file, where, environ)
                if check_triggers and kind == "scheduler.job":
                    _check_trigger(obj, file, where)
                result.setdefault(kind, []).append(obj)
    for kind, defs in result.items():
        seen: set[str] = set()
        for index, obj in enumerate(defs):
            if obj.name in seen:
                raise ConfigError(file, f"{kind}[{index}].name", f"{obj.name!r} is defined twice")
            seen.add(obj.name)
    return result


def _check_type(value: Any, annotation: str) -> Any:
    """Return the value converted to the annotated type, or raise TypeError."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    if base == "str" and isinstance(value, str):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base == "dict" and isinstance(value, dict):
        return value
    if base == "tuple[str, ...]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    expected = {"tuple[str, ...]": "array of strings", "dict": "table"}.get(base, base)
    raise TypeError(f"expected {expected}, got {type(value).__name__}")


def _build(cls: type, table: Any, file: str, where: str, environ: Mapping[str, str] | None) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(file, where, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    old_names = {f.metadata["old_name"]: f.name for f in fields.values() if f.metadata.get("old_name")}
    for key in table:
        if key not in fields and key not in old_names:
            raise ConfigError(file, f"{where}.{key}", "unknown key")
    for old, new in old_names.items():
        if old in table:
            if new in table:
                raise ConfigError(file, f"{where}.{old}", f"is the old name of {new}; give only {new}")
            logger.warning("%s: %s.%s is deprecated; call it %s", file, where, old, new)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        old = f.metadata.get("old_name")
        if name not in table and old not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(file, key, "is required")
            continue
        value = table[name] if name in table else table[old]
        if isinstance(value, str):
            value = _resolve_or_check(value, file, key, environ)
        try:
            kwargs[name] = _check_type(value, str(f.type))
        except TypeError as exc:
            raise ConfigError(file, key, str(exc)) from None
    obj = cls(**kwargs)
    _CHECKS.get(cls, _no_check)(obj, file, where)
    return obj


def _resolve_or_check(value: str, file: str, key: str, environ: Mapping[str, str] | None) -> str:
    if environ is not None:
        return resolve_env(value, file, key, environ)
    if "$ENV{" in _ENV_REF.sub("", value):
        raise ConfigError(file, key, "malformed $ENV{NAME} reference")
    return value


def _no_check(obj: Any, file: str, where: str) -> None:
    return None


def _need(ok: bool, file: str, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(file, key, reason)


def _check_name(obj: Any, file: str, where: str) -> None:
    _need(bool(_NAME.match(obj.name)), file, f"{where}.name", "must be letters, digits, '.', '_' or '-'")


def _check_url(url: str, file: str, key: str) -> None:
    """A URL whose password cannot be told apart from the rest is refused: no masking of it
    is safe to print, and drivers read it in different ways. The reason never quotes it."""
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(file, key, problem)


def _check_channel(obj: HttpChannelDef, file: str, where: str) -> None:
    _check_name(obj, file, where)
    _need(
        bool(_CID_SAFE_PATH.match(obj.path)),
        file,
        f"{where}.path",
        "must start with '/' and hold only URL-safe characters",
    )
    _need(
        not obj.path.startswith("/esb/") and obj.path not in ("/esb", "/metrics"),
        file,
        f"{where}.path",
        "/esb/ and /metrics belong to the server itself",
    )
    _need(obj.data_format in ("json", "raw"), file, f"{where}.data_format", "must be json or raw")
    for method in obj.methods:
        _need(method in HTTP_METHODS, file, f"{where}.methods", f"unknown method {method!r}")


def _check_job(obj: JobDef, file: str, where: str) -> None:
    _check_name(obj, file, where)
    problem = schedule_problem(obj)
    if problem is not None:
        _need(False, file, f"{where}.{problem[0]}", problem[1])
    if obj.repeats is not None:
        _need(obj.repeats >= 1, file, f"{where}.repeats", "must be at least 1")
    _need(obj.on_overlap in ("skip", "wait"), file, f"{where}.on_overlap", "must be skip or wait")
    if obj.misfire_grace_s is not None:
        _need(obj.misfire_grace_s >= 0, file, f"{where}.misfire_grace_s", "must not be negative")


def _check_trigger(obj: JobDef, file: str, where: str) -> None:
    problem = trigger_problem(obj)
    if problem is not None:
        _need(False, file, f"{where}.{problem[0]}", problem[1])


def _check_positive(attr: str) -> Any:
    def check(obj: Any, file: str, where: str) -> None:
        _check_name(obj, file, where)
        _need(getattr(obj, attr) > 0, file, f"{where}.{attr}", "must be positive")

    return check


def _check_amqp_outconn(obj: AmqpOutconnDef, file: str, where: str) -> None:
    _check_name(obj, file, where)
    _need(
        obj.url.startswith(("amqp://", "amqps://", "pyamqp://")),
        file,
        f"{where}.url",
        "must be amqp:// or amqps://",
    )
    _check_url(obj.url, file, f"{where}.url")
    for attr in ("pool_size", "acquire_timeout_s", "confirm_timeout_s", "blocked_timeout_s", "window"):
        _need(getattr(obj, attr) > 0, file, f"{where}.{attr}", "must be positive")
    _need(obj.heartbeat_s >= 0, file, f"{where}.heartbeat_s", "must not be negative (0 turns heartbeats off)")
    _need(obj.retry_budget_s >= 0, file, f"{where}.retry_budget_s", "must not be negative")
    _need(obj.delivery_mode in (1, 2), file, f"{where}.delivery_mode", "must be 1 (transient) or 2 (durable)")
    _need(
        obj.confirms or not obj.mandatory,
        file,
        f"{where}.mandatory",
        "needs confirms = true: without publisher confirms a message the broker returns "
        "unroutable cannot be told from one it took",
    )
    if obj.priority is not None:
        _need(0 <= obj.priority <= 255, file, f"{where}.priority", "must be 0 to 255")


def _check_amqp_channel(obj: AmqpChannelDef, file: str, where: str) -> None:
    _check_name(obj, file, where)
    _need((obj.url is None) != (obj.outconn is None), file, f"{where}.url", "give url or outconn, not both")
    if obj.url is not None:
        _need(
            obj.url.startswith(("amqp://", "amqps://")), file, f"{where}.url", "must be amqp:// or amqps://"
        )
        _check_url(obj.url, file, f"{where}.url")
    _need(bool(obj.queue), file, f"{where}.queue", "must not be empty")
    for attr in ("prefetch", "consumers_per_worker", "max_deliveries"):
        _need(getattr(obj, attr) > 0, file, f"{where}.{attr}", "must be positive")
    _need(obj.retry_delay_s >= 0, file, f"{where}.retry_delay_s", "must not be negative")
    _need(
        obj.data_format in ("json", "text", "raw"), file, f"{where}.data_format", "must be json, text or raw"
    )
    _need(obj.declare in (None, "classic", "quorum"), file, f"{where}.declare", "must be classic or quorum")


def _check_sql_outconn(obj: SqlOutconnDef, file: str, where: str) -> None:
    _check_name(obj, file, where)
    _need("://" in obj.url, file, f"{where}.url", "must be an SQLAlchemy URL such as postgresql+psycopg://...")
    _check_url(obj.url, file, f"{where}.url")
    _need(obj.pool_size > 0, file, f"{where}.pool_size", "must be positive")
    _need(obj.max_overflow >= 0, file, f"{where}.max_overflow", "must not be negative")
    _need(obj.pool_timeout_s > 0, file, f"{where}.pool_timeout_s", "must be positive")
    if obj.statement_timeout_s is not None:
        _need(obj.statement_timeout_s > 0, file, f"{where}.statement_timeout_s", "must be positive")


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Each run claims the notification, checks its hold before each call and records itself in
# the ODB: more often than this, the ODB would do little else.
MIN_NOTIFICATION_INTERVAL_S = 0.5
ON_CHANGE = ("refuse", "reset", "keep")


def _check_sql_notification(obj: SqlNotificationDef, file: str, where: str) -> None:
    _check_name(obj, file, where)
    _need(obj.interval_s >= MIN_NOTIFICATION_INTERVAL_S, file, f"{where}.interval_s",
          f"must be at least {MIN_NOTIFICATION_INTERVAL_S} seconds")
    _need(obj.max_rows > 0, file, f"{where}.max_rows", "must be positive")
    _need(obj.batch_size > 0, file, f"{where}.batch_size", "must be positive")
    _need(obj.lag_s >= 0, file, f"{where}.lag_s", "must not be negative")
    _need(bool(obj.query.strip()), file, f"{where}.query", "must not be empty")
    for column in obj.watermark:
        _need(bool(_IDENTIFIER.match(column)), file, f"{where}.watermark",
              f"{column!r} is not a plain column name of the query's result")
    _need(len(set(obj.watermark)) == len(obj.watermark), file, f"{where}.watermark", "names a column twice")
    if obj.watermark:
        problem = wrapping_problem(obj.query)
        _need(problem is None, file, f"{where}.query", f"{problem}")
    _need(obj.on_change in ON_CHANGE, file, f"{where}.on_change", "must be refuse, reset or keep")
    if obj.max_attempts is not None:
        _need(obj.max_attempts >= 1, file, f"{where}.max_attempts", "must be at least 1")


_CHECKS = {
    HttpChannelDef: _check_channel,
    BasicAuthDef: _check_name,
    ApiKeyDef: _check_name,
    JobDef: _check_job,
    SqlOutconnDef: _check_sql_outconn,
    SqlNotificationDef: _check_sql_notification,
    AmqpOutconnDef: _check_amqp_outconn,
    AmqpChannelDef: _check_amqp_channel,
}


def merge_units(
    units: Iterable[tuple[str, str]],
    *,
    environ: Mapping[str, str] | None = os.environ,
    check_triggers: bool = True,
) -> Definitions:
    """Parse and validate every (unit name, TOML text) together: all or nothing.

    Names are unique per kind across units; references (security, outconn) must resolve;
    channel paths must be unique. ``check_triggers``: see ``parse_unit``.
    """
    objects: dict[str, dict[str, Any]] = {}
    unit_of: dict[tuple[str, str], str] = {}
    for unit, text in units:
        parsed = parse_unit(unit, text, environ=environ, check_triggers=check_triggers)
        for kind, defs in parsed.items():
            for obj in defs:
                other = unit_of.get((kind, obj.name))
                if other is not None:
                    raise ConfigError(unit, f"{kind}.{obj.name}", f"already defined by {other}")
                objects.setdefault(kind, {})[obj.name] = obj
                unit_of[(kind, obj.name)] = unit
    definitions = Definitions(objects=objects, unit_of=unit_of)
    _check_references(definitions)
    return definitions


def _check_references(defs: Definitions) -> None:
    security = set(defs.of("security.basic_auth")) | set(defs.of("security.api_key"))
    paths: dict[str, str] = {}
    for channel in defs.channels.values():
        unit = defs.unit_of[("channel.http", channel.name)]
        if channel.security is not None and channel.security not in security:
            raise ConfigError(
                unit,
                f"channel.http.{channel.name}.security",
                f"no security definition named {channel.security!r}",
            )
        if channel.path in paths:
            raise ConfigError(
                unit,
                f"channel.http.{channel.name}.path",
                f"path {channel.path} is already used by channel {paths[channel.path]}",
            )
        paths[channel.path] = channel.name
    for channel in defs.of("channel.amqp").values():
        if channel.outconn is not None and channel.outconn not in defs.of("outconn.amqp"):
            unit = defs.unit_of[("channel.amqp", channel.name)]
            raise ConfigError(
                unit, f"channel.amqp.{channel.name}.outconn", f"no outconn.amqp named {channel.outconn!r}"
            )
    for note in defs.of("notification.sql").values():
        if note.outconn not in defs.of("outconn.sql"):
            unit = defs.unit_of[("notification.sql", note.name)]
            raise ConfigError(
                unit, f"notification.sql.{note.name}.outconn", f"no outconn.sql named {note.outconn!r}"
            )
