"""Services the SQL tests deploy (module name: sqlnote).

``sqlnote.collect`` appends each delivered row, with its notification's name and run, to
the Redis list ``sqlnote:<notification>``, which the tests read; a row whose ``body`` is
``poison`` makes the whole batch fail. ``sqlnote.query`` runs SQL through an outconn.
"""

import json

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
        if rows:
            self.redis.rpush(
                f"sqlnote:{note['name']}",
                *(json.dumps({"row": row, "run_id": note["run_id"], "mode": note["mode"]}) for row in rows),
            )
        else:
            self.redis.incr(f"sqlnote:{note['name']}:empty")


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
