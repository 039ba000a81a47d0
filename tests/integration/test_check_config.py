"""`esb check-config DIR` as an operator runs it: exit 0 on a good directory, exit 2 naming
the file, key and reason on a bad one, and nothing started either way."""

from __future__ import annotations

from tests.conftest import set_conf
from tests.helpers import esb

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
