"""What a careless or hostile user must not get out of a server: a password in any output,
a forged line in a log, a traceback from a closed pipe, a misleading 503.

Real server processes against the shared Redis, RabbitMQ and PostgreSQL; the outgoing
connections whose secrets are looked for point at a port nothing listens on, so that
every path an error takes (a service's exception, a status fact, a log line) is walked.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp
import psycopg
import requests

from tests.conftest import PG_URL
from tests.helpers import ESB, Server, esb, free_port, wait_until

DEPLOYABLES = Path(__file__).parent / "deployables"

# A password holding each character a URL's userinfo may not hold unencoded; each part
# between them is looked for on its own, so no tail or head of it may show either.
PASSWORD = "Alpha7#Bravo7/Charlie7@Delta7?Echo7"
PARTS = ("Alpha7", "Bravo7", "Charlie7", "Delta7", "Echo7")


def leaked(text: str) -> list[str]:
    return [part for part in PARTS if part in text]


def deploy_ok(server: Server, path: Path) -> None:
    done = server.deploy(path)
    assert done.returncode == 0, f"esb deploy {path.name}: {done.stdout}\n{done.stderr}"


def leaky_units(password: str, dead_port: int, prefix: str = "leak") -> tuple[str, str]:
    """An AMQP and an SQL outconn with PASSWORD in their URLs, both at DEAD_PORT."""
    mq = (f'[[outconn.amqp]]\nname = "{prefix}-mq"\n'
          f'url = "amqp://guest:{password}@127.0.0.1:{dead_port}//"\nretry_budget_s = 1\n')
    db = (f'[[outconn.sql]]\nname = "{prefix}-db"\n'
          f'url = "postgresql+psycopg://esb:{password}@127.0.0.1:{dead_port}/test"\npool_timeout_s = 2\n')
    return mq, db


def test_a_password_with_reserved_characters_shows_nowhere(esb_server: Any, tmp_path: Path) -> None:
    server = esb_server(workers=1)
    dead_port = free_port()
    mq, db = leaky_units(quote(PASSWORD, safe=""), dead_port)
    unit = tmp_path / "leak.toml"
    unit.write_text(mq + db + '[[notification.sql]]\nname = "leak-note"\noutconn = "leak-db"\n'
                    'query = "SELECT 1 AS id"\nservice = "leakt.tell"\ninterval_s = 5\n'
                    '[[channel.http]]\nname = "leak-use"\npath = "/leak/use"\nservice = "leakt.use"\n')
    deploy_ok(server, DEPLOYABLES / "leaktest.py")
    deploy_ok(server, unit)

    # The errors a service gets from each outconn, caught and raised.
    caught = server.post("/leak/use", {"amqp": "leak-mq", "sql": "leak-db"})
    assert caught.status_code == 200, caught.text
    errors = caught.json()
    assert "AmqpUnreachable" in errors["amqp"] and "OperationalError" in errors["sql"], errors
    raised = server.post("/leak/use", {"amqp": "leak-mq", "sql": "leak-db", "raise": True})
    assert raised.status_code == 503 and "leak-mq" in raised.text, raised.text
    assert leaked(caught.text + raised.text) == [], caught.text + raised.text

    # Status, once the worker's ping found the database down and the notification failed.
    def status_says_both_fail() -> dict | None:
        status = server.status()
        sql = {o["name"]: o for o in status["outconns"]["sql"]}.get("leak-db")
        note = {n["name"]: n for n in status["notifications"]}.get("leak-note")
        return status if sql and sql["reachable"] is False and note and note["last_error"] else None

    status = wait_until(status_says_both_fail, timeout_s=30, message="status shows both failing")
    text = esb("status", str(server.directory))
    admin = requests.get(server.url("/esb/status"), headers=server.admin_headers(), timeout=10)
    assert admin.status_code in (200, 503), admin.text
    shown = json.dumps(status) + text.stdout + text.stderr + admin.text
    assert leaked(shown) == [], shown
    # The text form lists what the README says it lists.
    rows = [line for line in text.stdout.splitlines() if line.startswith(("ok   ", "FAIL "))]
    for what in ("outconn.sql leak-db", "notification leak-note"):
        assert any(what in row for row in rows), text.stdout

    # check-config of a directory whose config/ holds the unit.
    (server.directory / "config" / "leak.toml").write_text(unit.read_text())
    checked = esb("check-config", str(server.directory))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert leaked(checked.stdout + checked.stderr) == [], checked.stdout + checked.stderr
    (server.directory / "config" / "leak.toml").unlink()

    # Unencoded, the same password is refused, by deploy and check-config, naming the file
    # and the key, saying what to do, and without a word of the password.
    raw_mq, raw_db = leaky_units(PASSWORD, dead_port, "raw")
    raws = (("raw-mq.toml", raw_mq, "outconn.amqp"), ("raw-db.toml", raw_db, "outconn.sql"))
    for name, text_, kind in raws:
        path = tmp_path / name
        path.write_text(text_)
        refused = server.deploy(path)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0, said
        assert name in said and f"{kind}[0].url" in said and "percent-encode" in said, said
        assert leaked(said) == [], said
        (server.directory / "config" / name).write_text(text_)
        checked = esb("check-config", str(server.directory))
        said = checked.stdout + checked.stderr
        assert checked.returncode == 2 and f"{kind}[0].url" in said and leaked(said) == [], said
        (server.directory / "config" / name).unlink()

    # Through pickup/: the refused file goes to rejected/, a good one to deployed/, both
    # (and the .error file) readable by their owner only, whatever mode they came with.
    pickup = server.directory / "pickup"
    for name, text_ in (("raw-mq.toml", raw_mq), ("fine.toml", '[[channel.http]]\nname = "fine"\n'
                                                               'path = "/fine"\nservice = "leakt.tell"\n')):
        dropped = pickup / name
        dropped.write_text(text_)
        dropped.chmod(0o644)
    rejected = wait_until(lambda: list((pickup / "rejected").glob("*raw-mq.toml.error")), timeout_s=30,
                          message="raw-mq.toml rejected")
    deployed = wait_until(lambda: list((pickup / "deployed").glob("*fine.toml")), timeout_s=30,
                          message="fine.toml deployed")
    error_text = rejected[0].read_text()
    assert "outconn.amqp[0].url" in error_text and leaked(error_text) == [], error_text
    for path in (*rejected, rejected[0].with_name(rejected[0].name.removesuffix(".error")), *deployed):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path}: {oct(path.stat().st_mode)}"

    # Every log, after all of that.
    for path in sorted((server.directory / "logs").rglob("*")):
        if path.is_file():
            assert leaked(path.read_text(errors="replace")) == [], f"{path}:\n{path.read_text()[-3000:]}"


def test_outside_values_cannot_begin_a_log_line(
    esb_server: Any, tmp_path: Path, amqp_broker: amqp.Channel, amqp_queue: str
) -> None:
    server = esb_server(workers=1)
    unit = tmp_path / "tell.toml"
    unit.write_text(f'[[channel.amqp]]\nname = "tell-{amqp_queue}"\nqueue = "{amqp_queue}"\n'
                    'service = "leakt.tell"\nurl = "amqp://guest:guest@127.0.0.1:5672//"\n'
                    'max_deliveries = 1\n')
    deploy_ok(server, DEPLOYABLES / "leaktest.py")
    deploy_ok(server, unit)

    # Request paths with LF, CRLF and an escape sequence, percent-encoded as a client may.
    for path in ("/nowhere%0AFORGED-LF 2026-01-01 ERROR x", "/nowhere%0D%0AFORGED-CRLF",
                 "/nowhere%1B[2JFORGED-ESC"):
        assert requests.get(server.url(path), timeout=10).status_code == 404

    # An AMQP message whose correlation_id, message_id and payload hold line breaks.
    channel = amqp_broker.connection.channel()
    for props, body in (({"correlation_id": "cid\nFORGED-CID x"}, {}),
                        ({"message_id": "mid\r\nFORGED-MID x"}, {"error": "bad\nFORGED-PAYLOAD x"})):
        channel.basic_publish(amqp.Message(json.dumps(body), content_type="application/json", **props),
                              exchange="", routing_key=amqp_queue)
    channel.close()
    wait_until(lambda: server.log().count(": told") >= 2 and "FORGED-PAYLOAD" in server.log(),
               timeout_s=60, message="both messages handled and the failure logged")
    wait_until(lambda: "FORGED-CRLF" in server.log(), message="the 404s logged")

    log = server.log()
    forged = [line for line in log.splitlines() if line.lstrip().startswith("FORGED")]
    assert forged == [], "\n".join(forged)
    assert "\x1b" not in log
    assert "/nowhere\\nFORGED-LF" in log and "/nowhere\\r\\nFORGED-CRLF" in log, log[-3000:]
    # The correlation_id is not a plain token: the message got a cid of its own.
    assert "FORGED-CID" not in log


def test_every_command_ends_quietly_when_its_output_pipe_closes(esb_server: Any) -> None:
    server = esb_server(start=False)
    for args in (["status", str(server.directory)], ["status", str(server.directory), "--json"],
                 ["check-config", str(server.directory)]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the command writes a byte (| head -0)
        try:
            done = subprocess.run([*ESB, *args], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                  timeout=60)
        finally:
            os.close(write_end)
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
        assert done.returncode == 141, (args, done.returncode, done.stderr)


def test_an_exhausted_sql_pool_answers_503_naming_it(esb_server: Any, tmp_path: Path, pg_url: str) -> None:
    server = esb_server(workers=1)
    app = "esb-pool-" + uuid.uuid4().hex[:8]
    unit = tmp_path / "pool.toml"
    unit.write_text(f'[[outconn.sql]]\nname = "pool-db"\nurl = "{pg_url}"\npool_size = 1\nmax_overflow = 0\n'
                    f'pool_timeout_s = 1\nconnect_args = {{ application_name = "{app}" }}\n'
                    '[[channel.http]]\nname = "pool-hold"\npath = "/pool/hold"\nservice = "leakt.hold"\n'
                    '[[channel.http]]\nname = "pool-query"\npath = "/pool/query"\nservice = "leakt.query"\n')
    deploy_ok(server, DEPLOYABLES / "leaktest.py")
    deploy_ok(server, unit)
    assert server.post("/pool/query", {"sql": "pool-db"}).status_code == 200

    held: list[requests.Response] = []
    holder = threading.Thread(target=lambda: held.append(
        server.post("/pool/hold", {"sql": "pool-db", "seconds": 6})))
    holder.start()
    try:
        dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")

        def sleeping() -> bool:
            with psycopg.connect(dsn, autocommit=True) as conn:
                return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                                    " AND query LIKE '%%pg_sleep%%' AND state = 'active'",
                                    (app,)).fetchone()[0] == 1

        wait_until(sleeping, message="the pool's one connection held")
        answer = server.post("/pool/query", {"sql": "pool-db"})
    finally:
        holder.join(timeout=30)
    assert answer.status_code == 503, answer.text
    assert "outconn pool-db: pool exhausted" in answer.json()["error"], answer.text
    assert "does not answer" not in answer.text
    assert held and held[0].status_code == 200, held
