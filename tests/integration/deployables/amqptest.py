"""Services the outgoing AMQP tests deploy (module name: amqptest); the outconn to use
comes in the payload, so one module serves every test's own definitions."""

from esb import Service
from esb.errors import OutconnError, SendManyFailed


class Send(Service):
    """One confirmed message; answers its message_id, or the name of the error."""

    name = "amqpt.send"

    def handle(self):
        p = self.request.payload
        try:
            outconn = self.out.amqp[p["outconn"]]
            extra = p.get("properties", {})
            message_id = outconn.send(
                p["body"], routing_key=p.get("routing_key"), headers=p.get("headers"), **extra
            )
        except OutconnError as exc:
            self.response.payload = {"error": type(exc).__name__, "message": str(exc)}
            return
        self.response.payload = {"message_id": message_id, "cid": self.cid}


class SendMany(Service):
    """COUNT messages {"batch": BATCH, "i": i}; answers how many were confirmed, or exactly
    which were not. Other outconn errors go up (a retryable one answers 503)."""

    name = "amqpt.send_many"

    def handle(self):
        p = self.request.payload
        bodies = ({"batch": p["batch"], "i": i} for i in range(p["count"]))
        try:
            confirmed = self.out.amqp[p["outconn"]].send_many(bodies, routing_key=p.get("routing_key"))
        except SendManyFailed as exc:
            self.response.payload = {
                "error": "SendManyFailed",
                "message": str(exc),
                "confirmed": exc.confirmed,
                "unconfirmed": exc.unconfirmed,
                "unsent_from": exc.unsent_from,
            }
            return
        self.response.payload = {"confirmed": confirmed}


class Record(Service):
    """For AMQP channels: counts each message's "i" in the Redis hash amqpt:<queue> and, in
    the same transaction, appends "<i> <worker pid>" to the list amqpt:<queue>:by (which
    worker handled each delivery, in order); raises for a message with "fail" and ends
    its worker at once for one with "exit" (after counting it, so every delivery shows)."""

    name = "amqpt.record"

    def handle(self):
        import os

        import gevent

        body = self.request.payload
        info = self.request.amqp
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(f"amqpt:{info.queue}", str(body["i"]), 1)
        pipe.rpush(f"amqpt:{info.queue}:by", f"{body['i']} {os.getpid()}")
        pipe.execute()
        if body.get("sleep_s"):
            gevent.sleep(body["sleep_s"])
        if body.get("exit"):
            os._exit(1)
        if body.get("fail"):
            raise RuntimeError(f"message {body['i']} always fails")
