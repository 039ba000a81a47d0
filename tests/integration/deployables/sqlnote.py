"""Services the SQL tests deploy (module name: sqlnote).

``sqlnote.collect`` appends each delivered row, with its notification's run, the service
call (an id of its own) and the pid of the worker that delivered it, to the Redis list
``sqlnote:<notification>``, which the tests read; a row whose ``body`` is ``poison``
makes the whole batch fail. With ``sqlnote:<notification>:hold_s`` set, the call then
lingers that long with its worker's pid in ``sqlnote:<notification>:holding``: a fault
test kills or stops the worker there, between the call's delivery and the watermark's
commit. ``sqlnote.query`` runs SQL through an outconn.
"""

import json
import os
import time
import uuid

from sqlalchemy import text

from esb import Service


class Collect(Service):
    name = "sqlnote.collect"

    def handle(self):
        rows = self.request.payload["rows"]
        note = self.request.notification
        if any(row.get("body") == "poison" for row in rows):
            self.redis.incr(f"sqlnote:{note['name']}:poisoned")
            raise ValueError("a poisoned row in this batch")
        key = f"sqlnote:{note['name']}"
        if not rows:
            self.redis.incr(f"{key}:empty")
            return
        pid, call = os.getpid(), uuid.uuid4().hex[:12]
        self.redis.rpush(key, *(json.dumps({"row": row, "run_id": note["run_id"], "mode": note["mode"],
                                            "pid": pid, "call": call}) for row in rows))
        hold_s = float(self.redis.get(f"{key}:hold_s") or 0)
        if hold_s > 0:
            self.redis.set(f"{key}:holding", pid, px=int(hold_s * 1000))
            time.sleep(hold_s)  # gevent's under the worker's monkey-patching: yields


class Count(Service):
    """Counts the rows it receives (INCRBY sqlnote:<notification>:count), keeps nothing."""

    name = "sqlnote.count"

    def handle(self):
        note = self.request.notification
        self.redis.incrby(f"sqlnote:{note['name']}:count", len(self.request.payload["rows"]))


class Query(Service):
    """Runs {"outconn", "sql", "params"} and answers the rows; "session": through session()."""

    name = "sqlnote.query"

    def handle(self):
        p = self.request.payload
        outconn = self.out.sql[p["outconn"]]
        if p.get("session"):
            with outconn.session() as session:
                rows = session.execute(text(p["sql"]), p.get("params", {})).mappings().all()
        else:
            with outconn.connect() as conn:
                rows = conn.execute(text(p["sql"]), p.get("params", {})).mappings().all()
        self.response.payload = {"rows": [{k: str(v) for k, v in row.items()} for row in rows]}
