"""Helpers for the HTTP integration tests: a server with the test services deployed, and
the checks every error answer must pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import Server, wait_until

DEPLOYABLES = Path(__file__).parent / "deployables"
BASIC_USER = "alice"
# Read by the worker through $ENV{...} in httptest.toml: proves the worker's environment is used.
BASIC_PASSWORD = "pw-from-the-environment"
API_KEY = "key-0123456789"
MISSING_CHANNEL = '[[channel.http]]\nname = "t-missing"\npath = "/t/missing"\nservice = "t.not-deployed"\n'


def answers_everywhere(server: Server, path: str, tries: int = 6) -> bool:
    """True once PATH answers 200 on fresh connections, which land on any of the workers."""
    for _ in range(tries):
        response = requests.post(server.url(path), timeout=5, headers={"Connection": "close"})
        if response.status_code != 200:
            return False
    return True


def deployed_server(esb_server: Any, odb_url: str | None, monkeypatch: pytest.MonkeyPatch,
                    **kwargs: Any) -> Server:
    """Start a server and hot-deploy httptest.py and httptest.toml with `esb deploy`."""
    monkeypatch.setenv("ESB_TEST_BASIC_PASSWORD", BASIC_PASSWORD)
    server = esb_server(odb=odb_url, start=False, **kwargs)
    # A deploy refuses a channel naming a service no module defines; config/ is applied at
    # start without that check, which is how a channel answering 503 comes about.
    (server.directory / "config" / "missing.toml").write_text(MISSING_CHANNEL)
    server.start()
    for name in ("httptest.py", "httptest.toml"):
        done = server.deploy(DEPLOYABLES / name)
        assert done.returncode == 0, f"esb deploy {name}: {done.stdout}\n{done.stderr}"
    wait_until(lambda: answers_everywhere(server, "/t/inspect"), message="deployed channels answering")
    return server


def assert_error(response: requests.Response, status: int) -> str:
    """An error answer: STATUS, a JSON body of exactly error and cid, the cid in the header."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "cid"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["cid"] == response.headers["X-ESB-CID"], (body, response.headers)
    return body["error"]
