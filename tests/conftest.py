"""Fixtures over real Redis, PostgreSQL and RabbitMQ on loopback; never mocks.

A missing backing service fails the test, under CI and on a developer's machine alike:
nothing on an acceptance list may pass by being skipped.
"""

from __future__ import annotations

import configparser
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import PrivateRedis, Server, esb, free_port

REDIS_URL = os.environ.get("ESB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("ESB_TEST_PG_URL", "postgresql+psycopg://127.0.0.1:5432/test")


def _missing(what: str, exc: Exception) -> None:
    pytest.fail(f"{what} is not reachable: {exc}")


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as exc:
        _missing("Redis at " + REDIS_URL, exc)
    yield client
    client.close()


@pytest.fixture
def cluster(redis_client: redis.Redis) -> Iterator[str]:
    """A cluster name unique to this test: every Redis key it makes starts esb:<cluster>:."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    for key in redis_client.scan_iter(match=f"esb:{name}:*", count=1000):
        redis_client.delete(key)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """An SQLAlchemy URL on a fresh PostgreSQL schema, dropped afterwards."""
    import psycopg

    schema = "esb_" + uuid.uuid4().hex[:10]
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.Error as exc:
        _missing("PostgreSQL at " + PG_URL, exc)
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def odb_url(request: pytest.FixtureRequest) -> str | None:
    """Run the test once with an SQLite ODB (None: quickstart's default) and once on PostgreSQL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")


def set_conf(directory: Path, section: str, key: str, value: object) -> None:
    """Change one server.conf key of a quickstarted directory."""
    path = directory / "server.conf"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    if not parser.has_section(section):
        parser.add_section(section)
    parser.set(section, key, str(value))
    with open(path, "w") as out:
        parser.write(out)


@pytest.fixture
def esb_server(tmp_path: Path, cluster: str) -> Iterator:
    """Factory: ``esb_server(odb=None, workers=2, timeout=30, conf={...}, start=True)``.

    Quickstarts a server on a free port against the test Redis and its unique cluster,
    starts ``esb start --fg`` in its own process group and waits for /esb/ping; on teardown
    stops it with ``esb stop``, then kills whatever is left of the group.
    """
    servers: list[Server] = []

    def make(odb: str | None = None, workers: int = 2, timeout: int = 30,
             conf: dict[tuple[str, str], object] | None = None, start: bool = True,
             embedded_redis: bool = False, name: str = "server") -> Server:
        directory = tmp_path / name
        port = free_port()
        args = ["quickstart", str(directory), "--port", str(port), "--workers", str(workers),
                "--cluster", cluster, "--timeout", str(timeout)]
        if not embedded_redis:
            args += ["--redis", REDIS_URL]
        if odb:
            args += ["--odb", odb]
        esb(*args, check=True)
        for (section, key), value in (conf or {}).items():
            set_conf(directory, section, key, value)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(directory / "server.conf")
        server = Server(directory=directory, port=port, cluster=cluster, workers=workers,
                        admin=(parser["admin"]["username"], parser["admin"]["password"]))
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        # Anything a test stopped must go on again before it can be stopped.
        for pid in server.all_pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis the test may kill and restart (not started yet: call ``.start()``)."""
    server = PrivateRedis(tmp_path)
    yield server
    server.kill()
