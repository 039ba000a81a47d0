"""Services the notification failure tests deploy (module name: notefail).

Each appends the rows it took, with the run and the worker's pid, to the Redis list
``sqlnote:<notification>`` as ``sqlnote.collect`` does, so a ``Feed`` reads them. Flags
are Redis keys ``notefail:<notification>:<flag>``:

- ``notefail.exit``: a row whose body is ``exit`` ends the worker (``os._exit``), counted
  in ``exits`` first;
- ``notefail.escape``: while ``escape`` is set, lets a gevent Timeout escape the call;
- ``notefail.mark``: marks the rows it took ``done = 1`` through outconn ``db``; a row
  whose body is ``poison`` fails the batch (counted in ``poisoned``) until ``cured`` is set;
- ``notefail.slow``: sleeps ``sleep_s`` per batch, a backlog that drains slowly.
"""

import json
import os
import time

import gevent
from sqlalchemy import bindparam, text

from esb import Service


def flag(service, name):
    return service.redis.get(f"notefail:{service.request.notification['name']}:{name}")


def record(service, rows):
    note = service.request.notification
    if rows:
        service.redis.rpush(f"sqlnote:{note['name']}", *(
            json.dumps({"row": row, "run_id": note["run_id"], "mode": note["mode"], "pid": os.getpid(),
                        "call": ""}) for row in rows))


class Exit(Service):
    name = "notefail.exit"

    def handle(self):
        rows = self.request.payload["rows"]
        if any(row.get("body") == "exit" for row in rows):
            self.redis.incr(f"notefail:{self.request.notification['name']}:exits")
            os._exit(1)
        record(self, rows)


class Escape(Service):
    name = "notefail.escape"

    def handle(self):
        if flag(self, "escape"):
            with gevent.Timeout(0.05):
                gevent.sleep(1)
        record(self, self.request.payload["rows"])


class Mark(Service):
    name = "notefail.mark"

    def handle(self):
        rows = self.request.payload["rows"]
        if any(row.get("body") == "poison" for row in rows) and not flag(self, "cured"):
            self.redis.incr(f"notefail:{self.request.notification['name']}:poisoned")
            raise ValueError("a poisoned row in this batch")
        table = self.request.payload.get("table") or flag(self, "table")
        if table and rows:
            statement = text(f"UPDATE {table} SET done = 1 WHERE id IN :ids").bindparams(
                bindparam("ids", expanding=True))
            with self.out.sql["db"].begin() as conn:
                conn.execute(statement, {"ids": [row["id"] for row in rows]})
        record(self, rows)


class Slow(Service):
    name = "notefail.slow"

    def handle(self):
        time.sleep(float(flag(self, "sleep_s") or 0))  # gevent's under the worker: yields
        record(self, self.request.payload["rows"])
