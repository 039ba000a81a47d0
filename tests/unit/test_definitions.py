"""Object definitions: the bad-TOML corpus, cross-unit rules and what a good unit becomes.

Each file in bad_toml/ is broken in one way; its first line, ``# expect: ...``, holds the
"file: key: reason" the error must contain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from esb.config import BasicAuthDef, HttpChannelDef, JobDef, merge_units, parse_unit
from esb.errors import ConfigError

CORPUS = sorted((Path(__file__).parent / "bad_toml").glob("*.toml"))
ENVIRON = {"ESB_CORPUS_SET": "from-env"}


def expectation(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect: ' line"
    return first.removeprefix("# expect: ")


def test_corpus_is_there():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_unit_is_rejected_with_file_key_and_reason(path: Path):
    with pytest.raises(ConfigError) as caught:
        merge_units([(path.name, path.read_text(encoding="utf-8"))], environ=ENVIRON)
    message = str(caught.value)
    assert message.startswith(path.name), message
    assert expectation(path) in message
    assert caught.value.file == path.name and caught.value.reason


def test_good_unit_becomes_typed_definitions():
    text = """
[[channel.http]]
name = "hello"
path = "/demo/hello"
service = "demo.hello"
security = "demo-basic"
methods = ["POST"]

[[security.basic_auth]]
name = "demo-basic"
username = "demo"
password = "$ENV{ESB_CORPUS_SET}"

[[scheduler.job]]
name = "tick"
service = "demo.tick"
type = "interval"
seconds = 2
payload = { source = "tick" }
"""
    defs = merge_units([("demo.toml", text)], environ=ENVIRON)
    assert defs.channels["hello"] == HttpChannelDef(
        name="hello", path="/demo/hello", service="demo.hello", security="demo-basic", methods=("POST",)
    )
    assert defs.of("security.basic_auth")["demo-basic"] == BasicAuthDef("demo-basic", "demo", "from-env")
    job = defs.jobs["tick"]
    assert isinstance(job, JobDef) and job.seconds == 2.0 and job.interval_s == 2.0
    assert job.payload == {"source": "tick"}
    assert defs.unit_of[("channel.http", "hello")] == "demo.toml"
    assert merge_units([], environ=ENVIRON).channels == {}


def test_env_references_are_checked_for_form_without_an_environment():
    unit = '[[security.api_key]]\nname = "k"\nheader = "X-Key"\nvalue = "$ENV{UNSET_ANYWHERE}"\n'
    # A deploying client may not share the server's environment: left unresolved, accepted.
    assert parse_unit("k.toml", unit, environ=None)["security.api_key"][0].value == "$ENV{UNSET_ANYWHERE}"
    broken = unit.replace("$ENV{UNSET_ANYWHERE}", "$ENV{1-bad}")
    with pytest.raises(ConfigError, match=r"^k\.toml: security\.api_key\[0\]\.value: malformed \$ENV"):
        parse_unit("k.toml", broken, environ=None)


CHANNEL = '[[channel.http]]\nname = "{name}"\npath = "{path}"\nservice = "s"\n{extra}'


def channel(name: str, path: str, extra: str = "") -> str:
    return CHANNEL.format(name=name, path=path, extra=extra)


def test_a_name_is_owned_by_one_unit():
    with pytest.raises(ConfigError) as caught:
        merge_units([("a.toml", channel("orders", "/a")), ("b.toml", channel("orders", "/b"))],
                    environ=ENVIRON)
    assert str(caught.value) == "b.toml: channel.http.orders: already defined by a.toml"
    # The same name in another kind is another object.
    key = '[[security.api_key]]\nname = "orders"\nheader = "X-Key"\nvalue = "v"\n'
    merge_units([("a.toml", channel("orders", "/a")), ("b.toml", key)], environ=ENVIRON)


def test_references_and_paths_are_checked_across_units():
    secured = channel("orders", "/orders", 'security = "partner"\n')
    key = '[[security.api_key]]\nname = "partner"\nheader = "X-Key"\nvalue = "v"\n'
    assert merge_units([("a.toml", secured), ("b.toml", key)], environ=ENVIRON).channels["orders"]
    with pytest.raises(ConfigError, match=r"^a\.toml: channel\.http\.orders\.security: no security"):
        merge_units([("a.toml", secured)], environ=ENVIRON)
    with pytest.raises(ConfigError) as caught:
        merge_units([("a.toml", channel("one", "/same")), ("b.toml", channel("two", "/same"))],
                    environ=ENVIRON)
    assert str(caught.value) == "b.toml: channel.http.two.path: path /same is already used by channel one"


def test_a_notification_interval_under_its_old_name_is_read_with_a_warning(caplog):
    text = """
[[outconn.sql]]
name = "db"
url = "sqlite://"

[[notification.sql]]
name = "n"
outconn = "db"
query = "SELECT 1"
service = "s"
interval = 3
"""
    with caplog.at_level("WARNING", logger="esb.config.definitions"):
        definitions = merge_units([("old.toml", text)], environ={})
    assert definitions.of("notification.sql")["n"].interval_s == 3.0
    assert "notification.sql[0].interval is deprecated; call it interval_s" in caplog.text
