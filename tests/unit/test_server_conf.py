"""server.conf: every problem is reported with the file and the key, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from esb.config import load_server_config
from esb.errors import ConfigError

GOOD = "[admin]\npassword = s3cret\n"

# (server.conf text, the "key: reason" the error must name)
BAD = [
    ("[main]\nprot = 80\n" + GOOD, "main.prot: unknown key"),
    ("[mian]\nport = 80\n" + GOOD, "[mian]: unknown section"),
    ("[main]\nport = eighty\n" + GOOD, "main.port: expected int, got 'eighty'"),
    ("[main]\nport = 80.5\n" + GOOD, "main.port: expected int, got '80.5'"),
    ("[main]\nport = 0\n" + GOOD, "main.port: must be between 1 and 65535"),
    ("[main]\nport = 65536\n" + GOOD, "main.port: must be between 1 and 65535"),
    ("[main]\nport = -1\n" + GOOD, "main.port: must be between 1 and 65535"),
    ("[main]\nworkers = 0\n" + GOOD, "main.workers: must be at least 1"),
    ("[main]\ntimeout_s = 1\n" + GOOD, "main.timeout_s: must be at least 2 seconds"),
    ("[main]\ncluster = a:b\n" + GOOD, "main.cluster: must not contain ':'"),
    ("[odb]\nurl = odb.sqlite\n" + GOOD, "odb.url: must be an SQLAlchemy URL"),
    ("[redis]\nurl = http://127.0.0.1:6379\n" + GOOD, "redis.url: must be 'embedded' or a redis://"),
    ("[redis]\nsocket_timeout_s = soon\n" + GOOD, "redis.socket_timeout_s: expected float, got 'soon'"),
    ("[http]\nmax_body_bytes = 0\n" + GOOD, "http.max_body_bytes: must be positive"),
    ("[http]\nmax_body_bytes = 10MiB\n" + GOOD, "http.max_body_bytes: expected int, got '10MiB'"),
    ("[http]\nmetrics_auth = everyone\n" + GOOD, "http.metrics_auth: must be admin or none"),
    ("[admin]\nusername = admin\n", "admin.password: must be set"),
    ("[scheduler]\nenabled = maybe\n" + GOOD, "scheduler.enabled: expected bool, got 'maybe'"),
    ("[observe]\nheartbeat_interval_s = 5\nstale_after_s = 5\n" + GOOD,
     "observe.stale_after_s: must be longer than observe.heartbeat_interval_s"),
    ("[main]\nworker_connections = 0\n" + GOOD, "main.worker_connections: must be at least 1"),
    ("[main]\nhost = \n" + GOOD, "main.host: must not be empty"),
    ("[main]\ngraceful_timeout_s = 0\n" + GOOD, "main.graceful_timeout_s: must be at least 1 second"),
    ("[redis]\nsocket_timeout_s = 0\n" + GOOD, "redis.socket_timeout_s: must be positive"),
    ("[http]\nbody_timeout_s = 0\n" + GOOD, "http.body_timeout_s: must be positive"),
    ("[dispatch]\ndead_letters_max = 0\n" + GOOD, "dispatch.dead_letters_max: must be at least 1"),
    ("[dispatch]\nconcurrency = 0\n" + GOOD, "dispatch.concurrency: must be at least 1"),
    ("[dispatch]\nmax_backlog = -1\n" + GOOD, "dispatch.max_backlog: must not be negative"),
    ("[dispatch]\nmax_deliveries = 0\n" + GOOD, "dispatch.max_deliveries: must be at least 1"),
    ("[dispatch]\nreclaim_idle_s = 0\n" + GOOD, "dispatch.reclaim_idle_s: must be positive"),
    ("[observe]\nblock_warn_s = 0\n" + GOOD, "observe.block_warn_s: must be positive"),
    ("[observe]\nheartbeat_interval_s = 0\n" + GOOD, "observe.heartbeat_interval_s: must be positive"),
    ("[scheduler]\nmisfire_grace_s = -1\n" + GOOD, "scheduler.misfire_grace_s: must not be negative"),
    ("[scheduler]\nlease_ttl_s = 0.5\n" + GOOD, "scheduler.lease_ttl_s: must be at least 1 second"),
    ("[scheduler]\ninflight_ttl_s = 0\n" + GOOD, "scheduler.inflight_ttl_s: must be positive"),
    ("[pickup]\nsettle_s = 0\n" + GOOD, "pickup.settle_s: must be positive"),
    ("[pickup]\nkeep_deployed = -1\n" + GOOD, "pickup.keep_deployed: must not be negative"),
    ("[logging]\nlevel = LOUD\n" + GOOD, "logging.level: must be DEBUG, INFO"),
]


def write_conf(directory: Path, text: str) -> str:
    path = directory / "server.conf"
    path.write_text(text)
    return str(path.resolve())


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[expected.split(":")[0] for _, expected in BAD])
def test_bad_server_conf_names_file_and_key(tmp_path: Path, text: str, expected: str):
    file = write_conf(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_server_config(tmp_path, environ={})
    assert str(caught.value).startswith(file + ": "), caught.value
    assert expected in str(caught.value)


def test_unparsable_server_conf_names_file_and_line(tmp_path: Path):
    file = write_conf(tmp_path, "# a comment\nport = 80\n[main]\n")
    with pytest.raises(ConfigError) as caught:
        load_server_config(tmp_path, environ={})
    assert str(caught.value).startswith(file), caught.value

    write_conf(tmp_path, "[main]\nport = 80\nport = 81\n" + GOOD)
    with pytest.raises(ConfigError) as caught:
        load_server_config(tmp_path, environ={})
    assert str(caught.value).startswith(file + ":3: "), caught.value
    assert "port" in str(caught.value)


def test_missing_server_conf(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"server\.conf: no such file; create the server with"):
        load_server_config(tmp_path, environ={})


def test_environment_overrides_are_checked_and_named(tmp_path: Path):
    write_conf(tmp_path, "[main]\nport = 8080\n" + GOOD)
    with pytest.raises(ConfigError) as caught:
        load_server_config(tmp_path, environ={"ESB_MAIN_PORT": "x"})
    assert str(caught.value) == "ESB_MAIN_PORT: main.port: expected int, got 'x'"
    with pytest.raises(ConfigError, match=r"server\.conf: main\.port: must be between 1 and 65535"):
        load_server_config(tmp_path, environ={"ESB_MAIN_PORT": "99999"})
    assert load_server_config(tmp_path, environ={"ESB_MAIN_PORT": "9090"}).main.port == 9090


def test_good_server_conf_fills_defaults(tmp_path: Path):
    write_conf(tmp_path, "[main]\nport = 8080\nworkers = 3\n[scheduler]\nenabled = off\n" + GOOD)
    config = load_server_config(tmp_path, environ={})
    assert (config.main.port, config.main.workers, config.scheduler.enabled) == (8080, 3, False)
    assert config.http.max_body_bytes == 10 * 1024 * 1024
    assert config.is_redis_embedded and config.redis_url.startswith("unix://")
    assert config.odb_url == f"sqlite:///{tmp_path.resolve()}/odb.sqlite"


def test_a_deprecated_key_name_is_read_with_a_warning(tmp_path, caplog):
    (tmp_path / "server.conf").write_text(
        "[main]\ntimeout = 12\ngraceful_timeout = 4\n[admin]\npassword = x\n", encoding="utf-8"
    )
    with caplog.at_level("WARNING", logger="esb.config.server_conf"):
        config = load_server_config(tmp_path, environ={})
    assert (config.main.timeout_s, config.main.graceful_timeout_s) == (12, 4)
    assert any("main.timeout is deprecated; call it main.timeout_s" in d for d in config.deprecations)
    assert "main.graceful_timeout is deprecated" in caplog.text


def test_a_retired_key_is_accepted_with_a_warning(tmp_path):
    """A server.conf copied from an older example still loads."""
    (tmp_path / "server.conf").write_text("[dispatch]\ndone_ttl_s = 86400\n" + GOOD, encoding="utf-8")
    config = load_server_config(tmp_path, environ={})
    [warning] = config.deprecations
    assert "dispatch.done_ttl_s is no longer read" in warning and "remove it" in warning


def test_the_environment_may_still_use_a_deprecated_name(tmp_path):
    (tmp_path / "server.conf").write_text("[admin]\npassword = x\n", encoding="utf-8")
    config = load_server_config(tmp_path, environ={"ESB_MAIN_TIMEOUT": "9"})
    assert config.main.timeout_s == 9
    assert config.deprecations == ("ESB_MAIN_TIMEOUT: main.timeout is deprecated; call it main.timeout_s",)
