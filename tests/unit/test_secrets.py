"""Literal secrets in definitions are stored as written and never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from esb.config import masked, masked_url, parse_unit
from esb.config.secrets import keep_private, url_problem
from esb.errors import ConfigError

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


def test_masked_url_never_shows_a_part_of_a_password_with_reserved_characters():
    password = "Alpha7#Bravo7/Charlie7@Delta7?Echo7"
    for url in (f"amqp://guest:{password}@127.0.0.1:5672//",
                f"postgresql+psycopg://esb:{password}@db/esb",
                "postgresql+psycopg://esb:Alpha7@Delta7@db/esb",
                "amqp://guest:Alpha7/Delta7@h//", "amqp://guest:Alpha7?Delta7@h//"):
        shown = masked_url(url)
        assert "Alpha7" not in shown and "Delta7" not in shown, shown
        assert url_problem(url) is not None and "percent-encode" in url_problem(url)
        assert "Alpha7" not in url_problem(url)
    encoded = "amqp://guest:Alpha7%23Bravo7%2FCharlie7%40Delta7@127.0.0.1:5672//"
    assert masked_url(encoded) == "amqp://guest:**@127.0.0.1:5672//" and url_problem(encoded) is None
    assert masked_url("postgresql://h/db?sslpassword=Alpha7&x=1") == "postgresql://h/db?sslpassword=**&x=1"
    assert url_problem("postgresql://u:Alpha7%zz@h/db") is not None  # a '%' that starts no escape
    assert url_problem("amqp://u:$ENV{MQ_PASSWORD}@h//") is None


def test_a_definition_shows_no_url_password_nor_connect_args():
    unit = '''
[[outconn.sql]]
name = "db"
url = "postgresql+psycopg://esb:db-pass@127.0.0.1/esb"
connect_args = { password = "driver-pass", application_name = "esb" }
'''
    (db,) = parse_unit("db.toml", unit, environ={})["outconn.sql"]
    shown = repr(db) + repr(masked(db))
    assert "db-pass" not in shown and "driver-pass" not in shown, shown
    assert masked(db)["connect_args"] == {"password": "**", "application_name": "**"}


def test_an_unencoded_reserved_character_is_refused_without_a_word_of_the_password():
    unit = '[[outconn.amqp]]\nname = "mq"\nurl = "amqp://guest:Alpha7#Delta7@127.0.0.1//"\n'
    with pytest.raises(ConfigError) as refused:
        parse_unit("mq.toml", unit, environ={})
    said = str(refused.value)
    assert "mq.toml" in said and "outconn.amqp[0].url" in said and "percent-encode" in said
    assert "Alpha7" not in said and "Delta7" not in said, said

