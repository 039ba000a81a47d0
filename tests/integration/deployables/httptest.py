"""Services the HTTP integration tests deploy with `esb deploy` (module name: httptest)."""

import json

from esb import BadInput, Service


class Inspect(Service):
    """Answers with what it was given, so a test can see the request as the service saw it."""

    name = "t.inspect"

    def handle(self):
        payload = self.request.payload
        http = self.request.http
        self.response.payload = {
            "type": type(payload).__name__,
            "payload": payload.decode("latin-1") if isinstance(payload, bytes) else payload,
            "method": http.method,
            "path": http.path,
            "query": dict(http.query),
            "probe": http.headers.get("X-Probe"),
            "cid": self.cid,
            "job": self.request.job,
        }


class Reverse(Service):
    """For a raw channel: answers the body bytes reversed."""

    name = "t.reverse"

    def handle(self):
        self.response.payload = bytes(reversed(self.request.payload))


class Fail(Service):
    name = "t.fail"

    def handle(self):
        raise RuntimeError("t.fail exploded on purpose")


class Reject(Service):
    name = "t.reject"

    def handle(self):
        raise BadInput("field 'order' is required")


class Created(Service):
    """Sets its own status code and headers."""

    name = "t.created"

    def handle(self):
        self.response.status_code = 201
        self.response.headers["X-Test-Header"] = "set-by-service"
        self.response.headers["Location"] = "/t/orders/7"
        self.response.payload = {"created": 7}


class Outer(Service):
    """Calls t.inner in-process and wraps its answer."""

    name = "t.outer"

    def handle(self):
        inner = self.invoke("t.inner", {"n": self.request.payload.get("n", 0)})
        self.response.payload = {"outer_cid": self.cid, "inner": inner}


class Inner(Service):
    name = "t.inner"

    def handle(self):
        self.response.payload = {"n": self.request.payload["n"] + 1, "cid": self.cid}


class Kick(Service):
    """Queues t.record for any worker of the cluster and answers at once."""

    name = "t.kick"

    def handle(self):
        msg_id = self.invoke_async("t.record", {"key": self.request.payload["key"], "value": "kicked"})
        self.response.payload = {"msg_id": msg_id, "cid": self.cid}


class Record(Service):
    """Run through the dispatch stream: leaves what it saw in a Redis list."""

    name = "t.record"

    def handle(self):
        seen = {
            "cid": self.cid,
            "payload": self.request.payload,
            "has_http": self.request.http is not None,
            "has_job": self.request.job is not None,
        }
        self.redis.rpush(self.request.payload["key"], json.dumps(seen))


class Raise(Service):
    """Raises what the payload names, BaseExceptions included: the service boundary's cases."""

    name = "t.raise"

    def handle(self):
        what = self.request.payload["raise"]
        if what == "SystemExit":
            raise SystemExit(self.request.payload.get("code", 1))
        if what == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if what == "GeneratorExit":
            raise GeneratorExit
        if what == "BadInput":
            raise BadInput("rejected on purpose", self.request.payload["status"])
        if what == "Timeout":
            import gevent

            raise gevent.Timeout(1)  # a Timeout passes the boundary; the worker answers it
        raise RuntimeError(what)


class Answer(Service):
    """Answers with the status, headers and payload it is given (``nan``/``inf`` as floats)."""

    name = "t.answer"

    def handle(self):
        given = self.request.payload
        if "status" in given:
            self.response.status_code = given["status"]
        for name, value in given.get("headers", {}).items():
            self.response.headers[name] = value
        payload = given.get("payload", {"ok": True})
        if payload in ("nan", "inf", "-inf"):
            payload = {"x": float(payload)}
        self.response.payload = payload


class InvokeNowhere(Service):
    name = "t.invoke-nowhere"

    def handle(self):
        self.response.payload = self.invoke("t.deployed-nowhere", {})


class Recurse(Service):
    """Invokes itself without end."""

    name = "t.recurse"

    def handle(self):
        self.response.payload = self.invoke("t.recurse", {})


class Pid(Service):
    """Answers the pid of the worker that ran it."""

    name = "t.pid"

    def handle(self):
        import os

        self.response.payload = {"pid": os.getpid()}
