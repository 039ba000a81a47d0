"""esb start / stop / status / check-config as an operator uses them."""

from __future__ import annotations

import json
import socket
import subprocess

from esb.launcher.children import process_start_time
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
        launcher = int((server.directory / "run" / "esb.pid").read_text().split()[0])
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


def test_stale_pid_files_naming_another_process_are_never_signalled(esb_server):
    """After a kill -9 of the launcher its pid may go to another process: `esb start`
    starts anyway, and `esb stop` never signals that process."""
    server = esb_server(start=False)
    directory = str(server.directory)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        start_time = process_start_time(stranger.pid)
        assert start_time is not None
        run = server.directory / "run"
        # The records of processes esb started long ago, whose pids went to `sleep`.
        (run / "esb.pid").write_text(f"{stranger.pid} {start_time - 1}\n")
        (run / "children.json").write_text(json.dumps(
            {"server": stranger.pid, "start_times": {"server": start_time - 1}}))
        stopped = esb("stop", directory)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stale run/esb.pid (pid {stranger.pid} is another process); removed" in stopped.stdout
        assert stranger.poll() is None

        (run / "esb.pid").write_text(f"{stranger.pid} {start_time - 1}\n")
        (run / "children.json").write_text(json.dumps(
            {"server": stranger.pid, "start_times": {"server": start_time - 1}}))
        started = esb("start", directory)
        try:
            assert started.returncode == 0, started.stderr
            assert "stale run/esb.pid" in started.stdout and "stale run/children.json" in started.stdout
            assert server.answers()
        finally:
            stopped = esb("stop", directory)
        assert stopped.returncode == 0, stopped.stderr
        assert not server.answers()
        assert stranger.poll() is None, "esb stop signalled a process it did not start"
    finally:
        stranger.kill()
        stranger.wait()


PARTNER_UNIT = """
[[security.api_key]]
name = "partner-key"
header = "X-API-Key"
value = "$ENV{PARTNER_KEY}"

[[channel.http]]
name = "partner-hello"
path = "/partner/hello"
service = "demo.hello"
security = "partner-key"
"""


def test_start_without_a_variable_a_stored_unit_names_is_refused(esb_server, tmp_path, monkeypatch):
    """A unit deployed while PARTNER_KEY was set, then a restart from a shell without it:
    `esb start` refuses, naming the unit, the variable and the way out, and so does
    `esb check-config` (which reads the ODB's units too)."""
    monkeypatch.setenv("PARTNER_KEY", "k1")
    server = esb_server()
    directory = str(server.directory)
    unit = tmp_path / "partner.toml"
    unit.write_text(PARTNER_UNIT)
    assert server.deploy(unit).returncode == 0
    server.stop()
    monkeypatch.delenv("PARTNER_KEY")

    started = esb("start", directory)
    try:
        assert started.returncode != 0, started.stdout
    finally:
        esb("stop", directory)
    for words in ("partner.toml", "PARTNER_KEY", f"esb undeploy {directory} partner.toml"):
        assert words in started.stderr, started.stderr

    checked = esb("check-config", directory)
    assert checked.returncode != 0, checked.stdout
    assert "partner.toml" in checked.stderr and "PARTNER_KEY" in checked.stderr, checked.stderr


def test_pid_file_without_a_start_time_naming_another_process_is_not_signalled(esb_server):
    """An older esb wrote only the pid: without a start time, the pid counts as esb's
    only when /proc shows an esb launcher of this directory, which `sleep` is not."""
    server = esb_server(start=False)
    directory = str(server.directory)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        run = server.directory / "run"
        (run / "esb.pid").write_text(f"{stranger.pid}\n")
        (run / "children.json").write_text(json.dumps({"server": stranger.pid}))
        stopped = esb("stop", directory)
        assert stranger.poll() is None, "esb stop signalled a process it did not start"
        assert stopped.returncode == 0, stopped.stderr
        assert f"stale run/esb.pid (pid {stranger.pid} is another process); removed" in stopped.stdout
    finally:
        stranger.kill()
        stranger.wait()
