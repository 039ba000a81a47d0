"""Services that put many messages on the dispatch stream fast (module name: fanout), for the
tests of what Redis keeps per message."""

from esb import Service


class Burst(Service):
    """Queues payload["count"] runs of fanout.count through invoke_async, one after another."""

    name = "fanout.burst"

    def handle(self):
        payload = self.request.payload
        for _ in range(payload["count"]):
            self.invoke_async("fanout.count", {"key": payload["key"]})
        self.response.payload = {"queued": payload["count"]}


class Count(Service):
    """Counts its runs under payload["key"]."""

    name = "fanout.count"

    def handle(self):
        self.redis.incr(self.request.payload["key"])
