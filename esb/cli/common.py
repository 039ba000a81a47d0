"""What every command shares: exit codes, loading a server directory, talking to it."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from esb.config import ServerConfig, load_server_config
from esb.errors import ConfigError

OK = 0
FAILURE = 1
BAD_CONFIG = 2


def load_or_exit(directory: str) -> ServerConfig:
    try:
        return load_server_config(directory)
    except ConfigError as exc:
        print(f"esb: {exc}", file=sys.stderr)
        raise SystemExit(BAD_CONFIG) from None


def base_url(config: ServerConfig) -> str:
    host = config.main.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{config.main.port}"


def admin_request(
    config: ServerConfig,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, bytes]:
    """Call the server's admin API with the admin credential; (status, body)."""
    import urllib.error  # here: `esb start --fg`, the launcher, would hold urllib and ssl
    import urllib.request
    token = base64.b64encode(f"{config.admin.username}:{config.admin.password}".encode()).decode()
    request = urllib.request.Request(
        base_url(config) + path,
        data=body,
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ping(config: ServerConfig, timeout_s: float = 2.0) -> bool:
    """True when /esb/ping answers 200: a worker serves the deployed generation."""
    return ping_answer(config, timeout_s) == ""


def ping_answer(config: ServerConfig, timeout_s: float = 2.0) -> str | None:
    """"" when /esb/ping answers 200; why not when a worker answers otherwise (503 while it
    has not built its generation); None when nothing answers."""
    import urllib.error  # here: see admin_request
    import urllib.request

    try:
        with urllib.request.urlopen(base_url(config) + "/esb/ping", timeout=timeout_s) as response:
            return "" if response.status == 200 else f"/esb/ping answered {response.status}"
    except urllib.error.HTTPError as exc:
        try:
            said = json.loads(exc.read()).get("error")
        except (OSError, ValueError, AttributeError):
            said = None
        return f"/esb/ping answered {exc.code}: {said or exc.reason}"
    except (OSError, urllib.error.URLError):
        return None


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))
