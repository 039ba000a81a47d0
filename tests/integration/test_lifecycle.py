"""esb start / stop / status / check-config as an operator uses them."""

from __future__ import annotations

import json
import socket

from tests.conftest import set_conf
from tests.helpers import esb, pid_alive


def test_background_start_stop_and_status(esb_server):
    server = esb_server(start=False)
    directory = str(server.directory)
    started = esb("start", directory)
    try:
        assert started.returncode == 0, started.stderr
        assert server.answers()
        again = esb("start", directory)
        assert again.returncode != 0 and "already running" in again.stderr

        status = esb("status", directory, "--json")
        report = json.loads(status.stdout)
        assert {"healthy", "workers", "scheduler"} <= set(report)
        assert len([w for w in report["workers"] if w["alive"]]) == 2
        launcher = int((server.directory / "run" / "esb.pid").read_text())
    finally:
        stopped = esb("stop", directory)
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_alive(launcher)
    assert not server.answers()
    down = esb("status", directory, "--json")
    assert down.returncode == 1 and json.loads(down.stdout)["healthy"] is False


def test_start_refuses_a_busy_port_with_the_reason(esb_server):
    server = esb_server(start=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", server.port))
        busy.listen()
        started = esb("start", str(server.directory))
    assert started.returncode != 0
    assert f"cannot listen on 127.0.0.1:{server.port}" in started.stderr, started.stderr


def test_bad_server_conf_names_file_and_key(esb_server):
    server = esb_server(start=False)
    set_conf(server.directory, "main", "workers", "many")
    for command in ("start", "check-config", "status"):
        done = esb(command, str(server.directory))
        assert done.returncode == 2, (command, done.stderr)
        assert "server.conf: main.workers: expected int, got 'many'" in done.stderr


def test_quickstart_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("mine")
    done = esb("quickstart", str(tmp_path / "x"))
    assert done.returncode != 0 and "not empty" in done.stderr
    conf = tmp_path / "y" / "server.conf"
    assert esb("quickstart", str(tmp_path / "y")).returncode == 0
    assert conf.stat().st_mode & 0o777 == 0o600
