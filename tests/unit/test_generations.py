"""Pure pieces of deploy: module names, the state at a generation, rollback, writers in pickup/."""

from __future__ import annotations

import os

import pytest

from esb.deploy.environment import record_server_environment, server_environment
from esb.deploy.pickup import open_for_writing
from esb.errors import DeployError
from esb.odb import MODULE, UNIT, OdbStore
from esb.service.loader import check_module_name


@pytest.mark.parametrize("name", ["esb", "json", "os", "redis", "gevent", "sqlalchemy"])
def test_module_name_taken_by_esb_stdlib_or_package_refused(name):
    with pytest.raises(DeployError) as caught:
        check_module_name(name)
    assert caught.value.file == f"{name}.py"


def test_module_name_of_a_service_module_allowed():
    check_module_name("orders_total")
    check_module_name("esb_orders")


def test_state_at_a_generation_and_rollback_to_last_good(tmp_path):
    odb = OdbStore(f"sqlite:///{tmp_path / 'odb.sqlite'}")
    odb.create_schema()
    odb.put(MODULE, "orders", "v1")
    odb.put(UNIT, "orders.toml", "channels")
    good = odb.generation()
    assert odb.set_last_good(good) and not odb.set_last_good(good - 1)
    odb.put(MODULE, "orders", "v2")
    odb.put(MODULE, "extra", "new")
    bad = next(m for m in odb.current(MODULE) if m.name == "orders")
    assert [m.content for m in odb.current(MODULE, at=good)] == ["v1"]

    assert odb.record_crash(bad.deployment_id, "h", 1) == 1
    assert odb.record_crash(bad.deployment_id, "h", 1) == 1  # the same death counts once
    assert odb.record_crash(bad.deployment_id, "h", 2) == 2
    after = odb.roll_back(bad.deployment_id, "2 workers died")
    assert after is not None and after > bad.deployment_id
    assert odb.roll_back(bad.deployment_id, "again") is None  # once only
    assert {m.name: m.content for m in odb.current(MODULE)} == {"orders": "v1"}
    assert [u.name for u in odb.current(UNIT)] == ["orders.toml"]
    (rejected,) = odb.rejections()
    assert (rejected.name, rejected.version, rejected.to_generation) == ("orders", 2, good)
    odb.dispose()


def test_server_environment_recorded_private(tmp_path):
    path = record_server_environment(tmp_path / "run", {"A": "1"})
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert server_environment(tmp_path / "run") == {"A": "1"}
    assert server_environment(tmp_path / "elsewhere") is None


def test_file_open_for_writing_is_seen(tmp_path):
    path = tmp_path / "half.toml"
    with open(path, "w") as out:
        out.write("x")
        out.flush()
        st = os.stat(path)
        assert (st.st_dev, st.st_ino) in open_for_writing()
    assert (st.st_dev, st.st_ino) not in open_for_writing()
