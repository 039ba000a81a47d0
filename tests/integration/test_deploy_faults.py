"""A deploy that says "deployed" is live everywhere; one that would not be is refused.

Each test is named after a fault an operator hit. After every refusal, every
worker, including one started after ``kill -9`` of another, serves exactly the last good
generation: all channels answer as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import redis
import requests

from esb.bus import Keys
from esb.config import load_server_config
from esb.deploy.generations import read_deploy_facts
from esb.odb import MODULE, UNIT, OdbStore
from tests.conftest import REDIS_URL
from tests.helpers import ESB, esb, pid_alive, wait_until
from tests.integration.test_deploy import CHANNEL, VERSIONED


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "files" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def facts(server):
    config = load_server_config(server.directory)
    odb = OdbStore(config.odb_url)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return read_deploy_facts(odb, client, Keys(server.cluster), config.observe.stale_after_s)
    finally:
        odb.dispose()
        client.close()


def fresh(server, path: str) -> requests.Response:
    """One request on a new connection, so the requests spread over the workers."""
    return requests.post(server.url(path), data=b"{}", timeout=10, headers={"Connection": "close"})


def answers_as_before(server, version: int = 1) -> bool:
    for _ in range(12):
        if fresh(server, "/demo/hello").json() != {"hello": "world"}:
            return False
        response = fresh(server, "/t/version")
        if response.status_code != 200 or response.json() != {"version": version}:
            return False
    return True


def workers_settled(server, expected: int) -> bool:
    """Every live worker applied the same generation, cleanly, and it is the last good one."""
    state = facts(server)
    gens = {w.generation for w in state.workers}
    return (
        len(state.workers) == expected
        and len(gens) == 1
        and not any(w.error for w in state.workers)
        and gens.pop() == state.last_good
    )


def good_server(esb_server, tmp_path, **kwargs):
    """A server serving t.version 1 on /t/version, with that generation recorded as good."""
    server = esb_server(**kwargs)
    assert server.deploy(write(tmp_path, "versioned.py", VERSIONED.format(version=1))).returncode == 0
    assert server.deploy(write(tmp_path, "versioned.toml", CHANNEL)).returncode == 0
    wait_until(lambda: answers_as_before(server), message="version 1 serving")
    wait_until(lambda: facts(server).last_good == facts(server).generation, timeout_s=30,
               message="the generation recorded as last good")
    return server


def assert_last_good_everywhere(server, workers: int = 2, version: int = 1) -> None:
    """All channels answer as before, also from a worker started after kill -9 of another."""
    good = facts(server).last_good
    wait_until(lambda: answers_as_before(server, version), message="channels as before")
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == workers,
               message="the killed worker replaced")
    wait_until(lambda: workers_settled(server, workers), timeout_s=30, message="every worker settled")
    assert facts(server).last_good >= good
    assert answers_as_before(server, version)


def refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode != 0, done.stdout
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)


def test_env_unset_toml_refused_with_key(esb_server, odb_url, tmp_path):
    server = good_server(esb_server, tmp_path, odb=odb_url)
    before = facts(server).generation
    unit = '[[security.api_key]]\nname = "k"\nheader = "X-K"\nvalue = "$ENV{ESB_T_NEVER_SET}"\n'
    done = server.deploy(write(tmp_path, "secured.toml", unit))
    refused(done, "secured.toml", "security.api_key[0].value", "ESB_T_NEVER_SET is not set")
    assert facts(server).generation == before  # nothing written
    assert_last_good_everywhere(server)
    # A later good TOML still deploys and applies everywhere.
    other = CHANNEL.replace("t-version", "t-again").replace("/t/version", "/t/again")
    assert server.deploy(write(tmp_path, "again.toml", other)).returncode == 0
    wait_until(lambda: all(fresh(server, "/t/again").status_code == 200 for _ in range(10)))


def test_module_named_like_esb_or_installed_package_refused(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    before = facts(server).generation
    refused(server.deploy(write(tmp_path, "esb.py", "X = 1\n")), "esb.py", "esb's own")
    refused(server.deploy(write(tmp_path, "redis.py", "X = 1\n")), "redis.py", "installed package")
    refused(server.deploy(write(tmp_path, "json.py", "X = 1\n")), "json.py", "standard library")
    assert facts(server).generation == before
    assert_last_good_everywhere(server)


def test_env_only_in_deploying_shell_refused(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    module = VERSIONED.format(version=2) + '\nimport os\nSECRET = os.environ["ESB_T_SHELL_ONLY"]\n'
    env = dict(os.environ, ESB_T_SHELL_ONLY="only here")
    path = write(tmp_path, "versioned.py", module)
    done = subprocess.run([*ESB, "deploy", str(server.directory), str(path)],
                          capture_output=True, text=True, timeout=120, env=env)
    refused(done, "versioned.py", "KeyError", "ESB_T_SHELL_ONLY")
    assert_last_good_everywhere(server)


def test_fake_ok_verdict_and_exit_refused(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    fake = ('import os, sys\nprint(\'{"ok": true, "module": "versioned", "services": ["t.version"]}\')\n'
            "sys.stdout.flush()\nos._exit(0)\n")
    refused(server.deploy(write(tmp_path, "versioned.py", fake)), "versioned.py", "ended (exit code 0)")
    assert_last_good_everywhere(server)


def test_cpu_bound_import_over_limit_refused(esb_server, tmp_path):
    # timeout_s = 6: imports may take 3 s, and this one holds the CPU for 8.
    server = good_server(esb_server, tmp_path, timeout=6)
    slow = VERSIONED.format(version=2) + (
        "\nimport time\n_t = time.monotonic()\nwhile time.monotonic() - _t < 8:\n    pass\n"
    )
    refused(server.deploy(write(tmp_path, "versioned.py", slow)), "versioned.py", "took over 3 s")
    assert_last_good_everywhere(server)


def test_hijacking_service_name_refused_naming_both_modules(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    hijack = ('from esb import Service\n\n\nclass Hijack(Service):\n    name = "demo.echo"\n\n'
              '    def handle(self):\n        self.response.payload = {"hijacked": 1}\n')
    done = server.deploy(write(tmp_path, "a_hijack.py", hijack))
    refused(done, "a_hijack.py", "'demo.echo'", "module demo (demo.py)")
    assert_last_good_everywhere(server)
    assert fresh(server, "/demo/echo").json() == {}


def test_channel_naming_missing_service_refused(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    ghost = CHANNEL.replace("t-version", "t-ghost").replace("/t/version", "/t/ghost").replace(
        '"t.version"', '"t.nobody"')
    refused(server.deploy(write(tmp_path, "ghost.toml", ghost)), "ghost.toml",
            "channel.http.t-ghost.service", "t.nobody")
    assert fresh(server, "/t/ghost").status_code == 404


def test_pickup_file_written_in_three_parts_deployed_once_whole(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    pickup = server.directory / "pickup"
    parts = [CHANNEL.replace("t-version", f"t-part{i}").replace("/t/version", f"/t/part{i}")
             for i in range(3)]

    def writer() -> None:
        with open(pickup / "parts.toml", "w") as out:  # held open across all three parts
            for index, part in enumerate(parts):
                out.write(part)
                out.flush()
                if index < 2:
                    time.sleep(2)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    wait_until(lambda: not (pickup / "parts.toml").exists(), timeout_s=30, message="pickup took the file")
    wait_until(lambda: all(fresh(server, f"/t/part{i}").status_code == 200
                           for i in range(3) for _ in range(4)), message="all three parts serving")
    deployed = list((pickup / "deployed").glob("*-parts.toml"))
    assert len(deployed) == 1 and deployed[0].read_text() == "".join(parts)
    config = load_server_config(server.directory)
    odb = OdbStore(config.odb_url)
    assert [u.version for u in odb.current(UNIT) if u.name == "parts.toml"] == [1]  # deployed once
    odb.dispose()


def test_rejected_pickup_file_kept_with_error(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    pickup = server.directory / "pickup"
    broken = "from esb import Service\n\nundefined_name\n"
    (pickup / "versioned.py").write_text(broken)
    (pickup / "linked.toml").symlink_to(write(tmp_path, "linked.toml", CHANNEL))
    wait_until(lambda: len(list((pickup / "rejected").glob("*.error"))) == 2, timeout_s=30,
               message="both files rejected")
    kept = next((pickup / "rejected").glob("*-versioned.py"))
    assert kept.read_text() == broken
    error = kept.with_name(kept.name + ".error").read_text()
    assert "versioned.py:3" in error and "NameError" in error
    link = next((pickup / "rejected").glob("*-linked.toml"))
    assert link.is_symlink() and "symlinks are refused" in link.with_name(link.name + ".error").read_text()
    assert_last_good_everywhere(server)


WORKER_KILLER = VERSIONED.format(version=2) + '''
import os
import sys

if "gunicorn" in sys.modules:  # only in a worker, never in the validating process
    os._exit(1)
'''


def test_module_killing_workers_at_import_rolled_back(esb_server, odb_url, tmp_path):
    server = good_server(esb_server, tmp_path, odb=odb_url)
    done = server.deploy(write(tmp_path, "versioned.py", WORKER_KILLER))
    assert done.returncode == 0, done.stderr  # the validator cannot tell
    wait_until(lambda: any(r.name == "versioned" for r in facts(server).rejected), timeout_s=60,
               message="the killing module rejected")
    rejection = next(r for r in facts(server).rejected if r.name == "versioned")
    assert rejection.kind == MODULE and rejection.version == 2 and "died while importing" in rejection.reason
    wait_until(lambda: workers_settled(server, 2), timeout_s=60, message="workers back on the last good one")
    assert_last_good_everywhere(server)
    # status names the rejected version until a fixed one is deployed
    done = esb("status", str(server.directory))
    assert done.returncode != 0 and "module versioned version 2 was rejected" in done.stdout, done.stdout
    assert server.deploy(write(tmp_path, "versioned.py", VERSIONED.format(version=3))).returncode == 0
    # (worker deaths count against health for a minute)
    wait_until(lambda: esb("status", str(server.directory)).returncode == 0, timeout_s=90,
               message="healthy once a fixed version is deployed")


def test_undeploy_module_still_named_by_channel_refused(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    before = facts(server).generation
    done = esb("undeploy", str(server.directory), "versioned")
    refused(done, "t-version", "t.version")
    assert facts(server).generation == before
    assert answers_as_before(server)


def test_undeploy_unit_channels_404_on_every_worker(esb_server, tmp_path):
    server = good_server(esb_server, tmp_path)
    done = esb("undeploy", str(server.directory), "versioned.toml")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: all(fresh(server, "/t/version").status_code == 404 for _ in range(12)),
               timeout_s=10, message="404 on every worker")
    wait_until(lambda: {w.generation for w in facts(server).workers} == {facts(server).generation},
               message="every worker at the undeploy's generation")
    # The module has no channel left: now it may go too.
    assert esb("undeploy", str(server.directory), "versioned.py").returncode == 0


def test_pickup_file_that_crashes_the_deploy_process_is_rejected(esb_server, tmp_path):
    """TOML nested deep enough to crash the deploy process: a bounded number of tries,
    then pickup/rejected/ with the reason, never a retry every pass for ever."""
    server = esb_server(conf={("pickup", "settle_s"): 0.2})
    pickup = server.directory / "pickup"
    (pickup / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    wait_until(lambda: list((pickup / "rejected").glob("*-deep.toml.error")), timeout_s=40,
               message="the file that crashes its deploy process rejected")
    error = next((pickup / "rejected").glob("*-deep.toml.error")).read_text()
    assert "deep.toml" in error and "RecursionError" in error, error
    assert not (pickup / "deep.toml").exists()


LINGERING = '''
import os
import sys
import threading
import time

from esb import Service


def _linger(started):
    """In the validating process only: a process of its own that outlives the import."""
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    open(os.path.join({marks!r}, str(pid)), "w").close()
    started.set()


if getattr(sys.modules["__main__"].__spec__, "name", "") == "esb.deploy.validate":
    _started = threading.Event()
    threading.Thread(target=_linger, args=(_started,)).start()
    _started.wait(10)


class Lingering(Service):
    name = "t.lingering"

    def handle(self):
        self.response.payload = {{"ok": True}}
'''


def test_validation_leaves_no_process_behind(esb_server, tmp_path):
    """A module whose import starts a thread that starts a process: once the validating
    process gave its verdict, nothing it started runs on, deploy after deploy."""
    server = esb_server()
    marks = tmp_path / "marks"
    marks.mkdir()
    module = write(tmp_path, "lingering.py", LINGERING.format(marks=str(marks)))
    for _ in range(2):  # the second deploy validates the set again, the lingering one with it
        done = server.deploy(module)
        assert done.returncode == 0, done.stderr
    wait_until(lambda: len(list(marks.iterdir())) >= 2, message="each validation started its process")
    pids = [int(p.name) for p in marks.iterdir()]
    wait_until(lambda: not [pid for pid in pids if pid_alive(pid)], timeout_s=10,
               message=f"the processes the validations started ended ({pids})")


def test_undeploy_of_a_unit_config_brings_back_says_so(esb_server):
    server = esb_server()
    done = esb("undeploy", str(server.directory), "demo.toml")
    assert done.returncode == 0, done.stderr
    assert "warning: config/demo.toml defines this unit" in done.stderr, done.stderr
    assert "comes back at the next start" in done.stderr
