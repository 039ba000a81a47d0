"""Hot deploy: new versions go live in every worker without a restart and without failing
requests in flight; broken files are rejected with file and line while the old version serves."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import requests

from tests.helpers import wait_until

VERSIONED = '''
from esb import Service


class Version(Service):
    name = "t.version"

    def handle(self):
        self.response.payload = {{"version": {version}}}
'''

CHANNEL = '''
[[channel.http]]
name = "t-version"
path = "/t/version"
service = "t.version"
'''

BROKEN = '''
from esb import Service

VALUE = 1


def broken():
    return undefined_name


broken()
'''


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "files" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def version_of(server) -> int | None:
    response = requests.post(server.url("/t/version"), timeout=5, headers={"Connection": "close"})
    return response.json()["version"] if response.status_code == 200 else None


def test_new_version_under_load_fails_no_request(esb_server, odb_url, tmp_path):
    server = esb_server(odb=odb_url)
    assert server.deploy(write(tmp_path, "versioned.py", VERSIONED.format(version=1))).returncode == 0
    assert server.deploy(write(tmp_path, "versioned.toml", CHANNEL)).returncode == 0
    wait_until(lambda: version_of(server) == 1, message="version 1 serving")

    outcomes: Counter = Counter()
    stop = threading.Event()

    def load() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(server.url("/t/version"), data=b"{}", timeout=10)
                outcomes[(response.status_code, response.json().get("version"))] += 1
            except requests.RequestException as exc:
                outcomes[("exception", type(exc).__name__)] += 1

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        deployed = server.deploy(write(tmp_path, "versioned.py", VERSIONED.format(version=2)))
        assert deployed.returncode == 0, deployed.stderr
        # Every worker switches: many fresh connections all answer version 2.
        wait_until(lambda: all(version_of(server) == 2 for _ in range(10)), message="version 2 everywhere")
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert set(outcomes) <= {(200, 1), (200, 2)}, outcomes
    assert outcomes[(200, 1)] > 0 and outcomes[(200, 2)] > 0, outcomes


def test_broken_module_is_rejected_and_old_version_serves(esb_server, tmp_path):
    server = esb_server()
    server.deploy(write(tmp_path, "versioned.py", VERSIONED.format(version=1)))
    server.deploy(write(tmp_path, "versioned.toml", CHANNEL))
    wait_until(lambda: version_of(server) == 1, message="version 1 serving")

    rejected = server.deploy(write(tmp_path, "versioned.py", BROKEN))
    assert rejected.returncode != 0
    assert "versioned.py:8" in rejected.stderr and "NameError" in rejected.stderr, rejected.stderr

    syntax = server.deploy(write(tmp_path, "versioned.py", "def oops(:\n    pass\n"))
    assert syntax.returncode != 0 and "versioned.py:1" in syntax.stderr, syntax.stderr

    # The same through pickup/: removed once handled, the rejection logged with file and line.
    dropped = server.directory / "pickup" / "versioned.py"
    dropped.write_text(BROKEN)
    wait_until(lambda: not dropped.exists(), message="pickup handled the file")
    wait_until(lambda: "versioned.py:8" in server.log() and "rejected" in server.log(),
               message="rejection logged with file and line")
    assert all(version_of(server) == 1 for _ in range(10))


def test_pickup_deploys_modules_and_definitions(esb_server, tmp_path):
    server = esb_server()
    pickup = server.directory / "pickup"
    (pickup / "versioned.py").write_text(VERSIONED.format(version=7))
    (pickup / "versioned.toml").write_text(CHANNEL)
    wait_until(lambda: version_of(server) == 7, message="pickup deploy serving")
    # A file moves to deployed/ once its deploy process has answered, which may be just
    # after the workers applied what it stored.
    wait_until(lambda: not [p for p in pickup.iterdir() if p.is_file()], message="pickup/ emptied")
    assert len(list((pickup / "deployed").iterdir())) == 2


def test_definition_unit_replaces_exactly_its_objects(esb_server, tmp_path):
    server = esb_server()
    server.deploy(write(tmp_path, "versioned.py", VERSIONED.format(version=1)))
    two_channels = CHANNEL + CHANNEL.replace("t-version", "t-other").replace("/t/version", "/t/other")
    assert server.deploy(write(tmp_path, "unit.toml", two_channels)).returncode == 0
    wait_until(lambda: requests.post(server.url("/t/other"), timeout=5).status_code == 200)

    # Deploying unit.toml again without t-other removes t-other only.
    assert server.deploy(write(tmp_path, "unit.toml", CHANNEL)).returncode == 0
    wait_until(lambda: requests.post(server.url("/t/other"), timeout=5).status_code == 404)
    assert version_of(server) == 1

    # Another file may not define an object name that unit.toml already owns.
    clash = server.deploy(write(tmp_path, "clash.toml", CHANNEL.replace("/t/version", "/t/clash")))
    assert clash.returncode != 0
    assert "clash.toml" in clash.stderr and "already defined by unit.toml" in clash.stderr, clash.stderr
    assert requests.post(server.url("/t/clash"), timeout=5).status_code == 404
