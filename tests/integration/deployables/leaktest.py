"""Services the leak tests deploy (module name: leaktest): each uses the outgoing
connections its payload names and answers what went wrong, so a test can look for a
secret in every error a service gets."""

from sqlalchemy import text

from esb import Service


class Use(Service):
    """Sends one message on payload["amqp"] and runs SELECT 1 on payload["sql"]; answers
    the str and repr of each error. With payload["raise"], raises the AMQP error instead."""

    name = "leakt.use"

    def handle(self):
        p = self.request.payload
        answer = {}
        try:
            self.out.amqp[p["amqp"]].send({"x": 1})
        except Exception as exc:
            if p.get("raise"):
                raise
            answer["amqp"] = f"{exc} {exc!r} {exc.__cause__!r}"
        try:
            with self.out.sql[p["sql"]].connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            answer["sql"] = f"{exc} {exc!r} {exc.__cause__!r}"
        self.response.payload = answer


class Hold(Service):
    """Holds a connection of payload["sql"] for payload["seconds"] (pg_sleep)."""

    name = "leakt.hold"

    def handle(self):
        p = self.request.payload
        with self.out.sql[p["sql"]].connect() as conn:
            conn.execute(text("SELECT pg_sleep(:s)"), {"s": p["seconds"]})
        self.response.payload = {"held": p["seconds"]}


class Tell(Service):
    """Logs a line (so its cid is on it), then fails with the payload's "error" if any."""

    name = "leakt.tell"

    def handle(self):
        self.logger.info("told")
        error = self.request.payload.get("error")
        if error:
            raise ValueError(error)


class Query(Service):
    """SELECT 1 on payload["sql"]; whatever it raises goes up."""

    name = "leakt.query"

    def handle(self):
        with self.out.sql[self.request.payload["sql"]].connect() as conn:
            self.response.payload = {"one": conn.execute(text("SELECT 1")).scalar()}
