"""What the arbiter, a worker and the scheduler import: each only what its role needs.

A worker neither imports APScheduler nor the scheduler package: the scheduler is a
process of its own, and a worker reads job definitions without building triggers. No
process of an idle server imports SQLAlchemy's ORM: the ODB's tables are Core tables
(5.6 MB of RSS in each of the arbiter, the workers and the scheduler); only a
service's ``out.sql[name].session()`` loads it. kombu and py-amqp load only with an
``[[outconn.amqp]]`` or ``[[channel.amqp]]`` (0.8 MB in the arbiter and each worker),
and the body of ``redis.asyncio`` never runs in the arbiter, a worker or the scheduler.
The scheduler runs no greenlets and serves no HTTP.
"""

from __future__ import annotations

from tests.helpers import loaded_packages, modules_loaded_by

# The ODB as the arbiter, the workers and the scheduler use it, on a throwaway SQLite file.
ODB_USE = """
import pathlib, tempfile
from esb.odb import MODULE, OdbStore
from esb.notification.store import NotificationRun, NotificationStore
odb = OdbStore(f"sqlite:///{pathlib.Path(tempfile.mkdtemp()) / 'odb.sqlite'}")
odb.create_schema()
odb.put(MODULE, "m", "x = 1")
assert [c.name for c in odb.current(MODULE)] == ["m"] and odb.generation() == 1
assert odb.set_last_good(1) and odb.last_good() == 1 and odb.record_crash(1, "h", 1) == 1
assert odb.roll_back(1, "test") == 2 and [r.deployment_id for r in odb.open_rejections()] == [1]
notes = NotificationStore(odb.engine)
assert notes.claim("n", "r1").watermark is None and notes.holds("n", "r1")
notes.advance("n", [1], "r1")
assert notes.count_attempt("n", "r1") == 1 and notes.state("n").watermark == [1]
assert notes.dead_letter_counts() == {}
odb.dispose()
"""

WORKER_PROBE = """
import esb.server.__main__  # the arbiter's entry: defers redis.asyncio (esb.imports)
import esb.server.application, esb.server.consumer, esb.server.hooks, esb.server.worker
from esb.config import merge_units

unit = '[[scheduler.job]]\\nname = "n"\\nservice = "s"\\ntype = "cron"\\ncron = "0 3 * * 1-5"\\n'
assert merge_units([("jobs.toml", unit)], check_triggers=False).jobs["n"].cron == "0 3 * * 1-5"
""" + ODB_USE

SCHEDULER_PROBE = "import esb.scheduler.__main__, esb.scheduler.process\n" + ODB_USE
# Neither role makes an asyncio Redis client: the body of redis.asyncio never runs.
UNUSED_REDIS_ASYNCIO = {"redis.asyncio.client", "redis.asyncio.cluster", "redis.asyncio.connection"}


def test_worker_modules_load_neither_apscheduler_nor_the_scheduler_nor_the_orm_nor_kombu():
    loaded = modules_loaded_by(WORKER_PROBE)
    forbidden = {"apscheduler", "esb.scheduler", "sqlalchemy.orm", "kombu", "amqp", "vine",
                 *UNUSED_REDIS_ASYNCIO}
    assert loaded_packages(loaded, forbidden) == set()


def test_the_scheduler_loads_no_web_stack_greenlet_or_orm():
    loaded = modules_loaded_by(SCHEDULER_PROBE)
    forbidden = {"falcon", "gunicorn", "gevent", "greenlet", "kombu", "amqp", "sqlalchemy.orm", "esb.server",
                 *UNUSED_REDIS_ASYNCIO}
    assert loaded_packages(loaded, forbidden) == set()
