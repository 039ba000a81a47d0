"""`esb status` cannot be fooled: each unhealthy condition makes it exit non-zero with one
line saying what and where, and it answers 0 again once the condition is fixed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.helpers import esb, wait_until

MISSING_CHANNEL = '''
[[channel.http]]
name = "t-orphan"
path = "/t/orphan"
service = "t.nosuch"
'''

FAILING = '''
from esb import Service


class Tick(Service):
    name = "t.tick"

    def handle(self):
        {body}
'''

TICK_JOB = '''
[[scheduler.job]]
name = "t-tick"
service = "t.tick"
type = "interval"
seconds = 1
'''


def status(server) -> subprocess.CompletedProcess:
    return esb("status", str(server.directory), "--json")


def problems(server) -> list[str]:
    return json.loads(status(server).stdout)["problems"]


def healthy(server) -> bool:
    done = status(server)
    report = json.loads(done.stdout)
    assert (done.returncode == 0) == report["healthy"], report
    return done.returncode == 0


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_channel_naming_a_service_not_deployed_is_unhealthy(esb_server):
    server = esb_server(start=False)
    # Units in config/ are deployed at start without the service check a deploy makes.
    (server.directory / "config" / "orphan.toml").write_text(MISSING_CHANNEL)
    server.start()
    wait_until(lambda: not healthy(server) and any("t-orphan" in p for p in problems(server)),
               message="status naming the channel")
    line = next(p for p in problems(server) if "t-orphan" in p)
    assert "channel.http t-orphan (orphan.toml) names service t.nosuch, which is not deployed" == line
    done = esb("undeploy", str(server.directory), "orphan.toml")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: healthy(server), timeout_s=30, message="healthy once the channel is gone")


def test_odb_deleted_and_restarted_is_unhealthy(esb_server):
    server = esb_server()
    wait_until(lambda: healthy(server), timeout_s=30, message="a fresh server healthy")
    server.stop()
    (server.directory / "odb.sqlite").unlink()
    server.start()
    # config/demo.toml came back at start; the module demo.py lived only in the ODB.
    wait_until(lambda: any("demo-hello" in p and "not deployed" in p for p in problems(server)),
               message="the channels without their services named")
    assert not healthy(server)
    services = Path(__file__).resolve().parents[2] / "services" / "demo.py"
    assert server.deploy(services).returncode == 0
    wait_until(lambda: healthy(server), timeout_s=30, message="healthy once demo.py is back")


def test_job_whose_service_fails_is_unhealthy_until_a_run_succeeds(esb_server, tmp_path):
    server = esb_server()
    failing = write(tmp_path, "ticker.py", FAILING.format(body='raise RuntimeError("tick failed")'))
    done = server.deploy(failing, write(tmp_path, "ticker.toml", TICK_JOB))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: any(p.startswith("job t-tick: its last run failed") for p in problems(server)),
               timeout_s=30, message="the failing job named")
    assert not healthy(server)
    (tmp_path / "fixed").mkdir()
    fixed = write(tmp_path / "fixed", "ticker.py", FAILING.format(body="self.response.payload = {}"))
    assert server.deploy(fixed).returncode == 0
    wait_until(lambda: healthy(server), timeout_s=30, message="healthy after a successful run")


def test_server_directory_odb_redis_and_logs_are_private(esb_server):
    server = esb_server(embedded_redis=True)
    modes = {}
    for path in [server.directory, server.directory / "odb.sqlite", server.directory / "server.conf",
                 *(server.directory / "logs").glob("*.log"), *(server.directory / "run").glob("*.aof*"),
                 *(server.directory / "run").rglob("appendonly*")]:
        modes[str(path)] = path.stat().st_mode & 0o777
    assert modes.pop(str(server.directory)) == 0o700
    assert any("appendonly" in p for p in modes), modes
    assert any(p.endswith("server.log") for p in modes), modes
    group_or_other = {p: oct(m) for p, m in modes.items() if m & 0o077}
    assert not group_or_other, group_or_other
    # Files an older esb left readable are made private again at the next start.
    server.stop()
    for path in (server.directory / "odb.sqlite", server.directory / "logs" / "server.log"):
        path.chmod(0o644)
    server.start()
    for path in (server.directory / "odb.sqlite", server.directory / "logs" / "server.log"):
        assert path.stat().st_mode & 0o777 == 0o600, path


WORKERS_ONLY_BROKEN = '''
import sys

from esb import Service

# The validator imports this without gunicorn; a worker has gunicorn loaded.
if "gunicorn" in sys.modules and {broken}:
    raise RuntimeError("this module only fails in a worker")


class Fragile(Service):
    name = "t.fragile"

    def handle(self):
        self.response.payload = {{"ok": True}}
'''


def test_a_generation_workers_cannot_apply_is_unhealthy_until_fixed(esb_server, tmp_path):
    server = esb_server()
    wait_until(lambda: healthy(server), timeout_s=30, message="a fresh server healthy")
    done = esb("deploy", str(server.directory), str(write(tmp_path, "fragile.py",
                                                         WORKERS_ONLY_BROKEN.format(broken=True))))
    assert done.returncode == 0, done.stderr  # the validator could not see it
    # Every worker refuses the generation and keeps serving the one before: the workers
    # say so at once, and past a few seconds they are also behind the ODB.
    wait_until(lambda: not healthy(server)
               and any("could not apply" in p or "generation" in p for p in problems(server)),
               timeout_s=30, message=f"status naming the generation: {problems(server)}")
    assert server.session.post(server.url("/demo/hello"), json={}, timeout=10).status_code == 200
    done = esb("deploy", str(server.directory), str(write(tmp_path, "fragile.py",
                                                         WORKERS_ONLY_BROKEN.format(broken=False))))
    assert done.returncode == 0, done.stderr
    wait_until(lambda: healthy(server), timeout_s=60, message=f"healthy once fixed: {problems(server)}")
