"""What a careless or hostile user must not get out of a server: a password in any output,
a forged line in a log, a traceback from a closed pipe, a misleading 503.

Real server processes against the shared Redis, RabbitMQ and PostgreSQL; the outgoing
connections whose secrets are looked for point at a port nothing listens on, so that
every path an error takes (a service's exception, a status fact, a log line) is walked.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import amqp
import requests

from tests.helpers import ESB, Server, wait_until

DEPLOYABLES = Path(__file__).parent / "deployables"




def deploy_ok(server: Server, path: Path) -> None:
    done = server.deploy(path)
    assert done.returncode == 0, f"esb deploy {path.name}: {done.stdout}\n{done.stderr}"



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

