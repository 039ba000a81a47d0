"""Literal secrets in definitions are stored as written and never shown."""

from __future__ import annotations

from pathlib import Path

from esb.config import masked, masked_url, parse_unit
from esb.config.secrets import keep_private

UNIT = '''
[[security.basic_auth]]
name = "b"
username = "u"
password = "hunter2"

[[security.api_key]]
name = "k"
header = "X-Key"
value = "sekrit-key"

[[outconn.amqp]]
name = "mq"
url = "amqp://guest:mq-pass@127.0.0.1:5672//"
'''


def test_secrets_kept_but_never_shown():
    parsed = parse_unit("s.toml", UNIT, environ={})
    (basic,), (key,) = parsed["security.basic_auth"], parsed["security.api_key"]
    (mq,) = parsed["outconn.amqp"]
    assert basic.password == "hunter2" and key.value == "sekrit-key"  # stored as written
    shown = repr(parsed) + repr(masked(basic)) + repr(masked(key)) + repr(masked(mq))
    for secret in ("hunter2", "sekrit-key", "mq-pass"):
        assert secret not in shown, shown
    assert masked(basic)["password"] == "**" and masked(mq)["url"] == "amqp://guest:**@127.0.0.1:5672//"


def test_masked_url_keeps_everything_but_the_password():
    assert masked_url("postgresql://esb:pw@db:5432/esb") == "postgresql://esb:**@db:5432/esb"
    assert masked_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert masked_url("sqlite:///odb.sqlite") == "sqlite:///odb.sqlite"


def test_keep_private_tightens_what_an_older_esb_left(tmp_path: Path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "run" / "appendonlydir").mkdir(parents=True)
    made = [tmp_path / "logs" / "server.log", tmp_path / "run" / "appendonlydir" / "a.aof",
            tmp_path / "odb.sqlite"]
    for path in made:
        path.write_text("x")
        path.chmod(0o644)
    tmp_path.chmod(0o755)
    keep_private(tmp_path, f"sqlite:///{tmp_path / 'odb.sqlite'}")
    assert tmp_path.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "run" / "appendonlydir").stat().st_mode & 0o777 == 0o700
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in made)
