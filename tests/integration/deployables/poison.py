"""Services that misbehave on the dispatch path (module name: poison), for the fault tests
of issue 8. Each counts its runs in Redis under ``payload["key"]`` so a test can tell how
often it ran, and on which worker."""

import os
import time

from esb import Service
from esb.errors import ServiceNotFound


def count_run(service):
    key = service.request.payload["key"]
    service.redis.incr(key + ":runs")
    service.redis.rpush(key + ":pids", os.getpid())


class Kick(Service):
    """Queues payload["service"] with payload["payload"] through invoke_async."""

    name = "poison.kick"

    def handle(self):
        try:
            msg_id = self.invoke_async(self.request.payload["service"], self.request.payload["payload"])
        except ServiceNotFound as exc:
            self.response.payload = {"not_found": str(exc)}
            return
        self.response.payload = {"msg_id": msg_id}


class Exit(Service):
    """raise SystemExit(payload["code"])."""

    name = "poison.exit"

    def handle(self):
        count_run(self)
        raise SystemExit(self.request.payload["code"])


class Interrupt(Service):
    name = "poison.interrupt"

    def handle(self):
        count_run(self)
        raise KeyboardInterrupt


class HardExit(Service):
    """os._exit(payload["code"]): the worker process ends there and then, unless the key's
    ":fixed" flag is set (the service was "fixed" and the message may be retried)."""

    name = "poison.hard_exit"

    def handle(self):
        count_run(self)
        if self.redis.get(self.request.payload["key"] + ":fixed"):
            self.redis.incr(self.request.payload["key"] + ":ok")
            return
        # The worker that answers the kick may be the one that takes the message: let that
        # answer leave first (its loss would say nothing about what the tests look at).
        time.sleep(0.3)  # gevent's sleep in a worker: the loop goes on meanwhile
        os._exit(self.request.payload.get("code", 1))


class Hog(Service):
    """Holds the CPU (and so the worker's event loop) for payload["seconds"]."""

    name = "poison.hog"

    def handle(self):
        count_run(self)
        deadline = time.monotonic() + self.request.payload["seconds"]
        while time.monotonic() < deadline:
            pass
        self.redis.incr(self.request.payload["key"] + ":done")


class Sleep(Service):
    """Sleeps (yielding) for payload["seconds"]."""

    name = "poison.sleep"

    def handle(self):
        count_run(self)
        time.sleep(self.request.payload["seconds"])
        self.redis.incr(self.request.payload["key"] + ":done")
