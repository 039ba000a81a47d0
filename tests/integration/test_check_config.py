"""`esb check-config DIR` as an operator runs it: exit 0 on a good directory, exit 2 naming
the file, key and reason on a bad one, and nothing started either way."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import set_conf
from tests.helpers import esb, free_port

SECURED = """
[[security.api_key]]
name = "partner"
header = "X-API-Key"
value = "$ENV{PARTNER_KEY_NOT_SET_HERE}"

[[channel.http]]
name = "partner-orders"
path = "/partner/orders"
service = "orders.new"
security = "partner"
"""


def test_check_config(esb_server):
    server = esb_server(start=False)
    directory = str(server.directory)
    config = server.directory / "config"

    good = esb("check-config", directory)
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout

    # $ENV{...} is resolved where the server runs, so an unset variable is no error here.
    (config / "partner.toml").write_text(SECURED)
    assert esb("check-config", directory).returncode == 0

    broken = {
        'path = "partner/orders"': "config/x.toml: channel.http[0].path: must start with '/'",
        'sevrice = "x"': "config/x.toml: channel.http[0].sevrice: unknown key",
        'security = "nobody"': "config/x.toml: channel.http.x.security: no security definition",
        "path = /x": "config/x.toml:4: invalid TOML",
    }
    for line, expected in broken.items():
        text = '[[channel.http]]\nname = "x"\nservice = "s"\n'
        text += line + "\n" if line.startswith("path") else f'path = "/x"\n{line}\n'
        (config / "x.toml").write_text(text)
        done = esb("check-config", directory)
        assert done.returncode == 2, (line, done.stdout, done.stderr)
        assert expected in done.stderr, (line, done.stderr)

    # A name or a path another file already holds.
    (config / "x.toml").write_text('[[channel.http]]\nname = "demo-hello"\npath = "/x"\nservice = "s"\n')
    done = esb("check-config", directory)
    assert done.returncode == 2
    assert "config/x.toml: channel.http.demo-hello: already defined by config/demo.toml" in done.stderr
    (config / "x.toml").write_text('[[channel.http]]\nname = "x"\npath = "/demo/hello"\nservice = "s"\n')
    done = esb("check-config", directory)
    assert done.returncode == 2 and "channel.http.x.path: path /demo/hello is already used" in done.stderr

    (config / "x.toml").unlink()
    assert esb("check-config", directory).returncode == 0
    set_conf(server.directory, "main", "port", "0")
    done = esb("check-config", directory)
    assert done.returncode == 2 and "server.conf: main.port: must be between 1 and 65535" in done.stderr
    assert not (server.directory / "run" / "arbiter.pid").exists()


NOTIFICATION = """
[[outconn.sql]]
name = "orders-db"
url = "{url}"

[[notification.sql]]
name = "new-orders"
outconn = "orders-db"
query = "SELECT id, updated_at FROM orders_{suffix}"
service = "orders.on-new"
watermark = {watermark}
"""


@pytest.fixture(params=["sqlite", "postgres"])
def orders_db(request: pytest.FixtureRequest, tmp_path) -> str:
    """The URL of a database holding a table orders_cc (id, updated_at)."""
    sqlite = f"sqlite:///{tmp_path / 'o.db'}"
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else sqlite
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders_cc (id INTEGER PRIMARY KEY, updated_at TIMESTAMP)"))
    engine.dispose()
    return url


def test_check_config_asks_the_database_for_the_watermark_columns(esb_server, orders_db):
    """A watermark column missing from the query's result is an error with file, key and
    reason; a database that cannot be asked leaves the check undone, with a warning."""
    server = esb_server(start=False)
    directory = str(server.directory)
    unit = server.directory / "config" / "notes.toml"

    def check(url: str = orders_db, watermark: str = '["updated_at", "id"]', suffix: str = "cc"):
        unit.write_text(NOTIFICATION.format(url=url, watermark=watermark, suffix=suffix))
        return esb("check-config", directory)

    done = check()
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    done = check(watermark='["changed_at", "id"]')
    assert done.returncode == 2, done.stdout
    assert ("config/notes.toml: notification.sql.new-orders.watermark: column(s) changed_at missing "
            "from the query's result (it has id, updated_at)") in done.stderr
    # The database refuses the query (no such table): not checked, and why.
    done = check(suffix="gone")
    assert done.returncode == 0, done.stderr
    assert "config/notes.toml: notification.sql.new-orders.watermark: column check not done" in done.stderr
    assert "orders_gone" in done.stderr
    # The database is not there at all.
    down = f"postgresql+psycopg://127.0.0.1:{free_port()}/test"
    done = check(url=down, watermark='["changed_at"]')
    assert done.returncode == 0, done.stderr
    assert "column check not done: outconn.sql orders-db:" in done.stderr
    done = check(url="postgresql+psycopg://u:$ENV{ESB_CC_UNSET_PASSWORD}@127.0.0.1/test")
    assert done.returncode == 0 and "environment variable ESB_CC_UNSET_PASSWORD is not set" in done.stderr
    # The checks the files alone settle, for notifications too.
    unit.write_text(NOTIFICATION.format(url=orders_db, watermark='["id"]', suffix="cc")
                    .replace('outconn = "orders-db"', 'outconn = "nowhere"'))
    done = esb("check-config", directory)
    assert done.returncode == 2
    assert "notes.toml: notification.sql.new-orders.outconn: no outconn.sql named 'nowhere'" in done.stderr
    unit.write_text(NOTIFICATION.format(url=orders_db, watermark='["id"]', suffix="cc") + "interval_s = 0\n")
    done = esb("check-config", directory)
    assert done.returncode == 2
    assert "config/notes.toml: notification.sql[0].interval_s: must be at least 0.5 seconds" in done.stderr
