"""How often an AMQP channel's message was delivered, counted where a killed worker cannot
lose the count, and the rule that lets the count name the message that killed it.

A service that ends its worker (``os._exit``, a crash in C, the arbiter's timeout) never
returns a failure, so the ``x-esb-deliveries`` header of the retry copies cannot count
those deliveries. The broker marks a message it hands out again ``redelivered``; such a
message gets a counter in Redis (``Keys.amqp_deliveries``), incremented before its service
runs. A first delivery costs nothing: most messages never touch Redis.

A worker that dies ends every message it was running. So that the count of a message that
comes back names it and not its neighbours, a redelivered message runs alone in its worker:
it waits until the other AMQP messages of the worker finished, and none starts meanwhile
(``Alone``). After a worker death or a broken connection the messages that come back
therefore run one at a time until they are through; that is the price of telling the
message that kills workers from the ones it took down with it. A run alone waits at most
``ALONE_WAIT_S`` for the others: a service that hangs must not stop every channel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager

import amqp
import redis
from gevent.event import Event
from gevent.lock import Semaphore

from esb.bus import Keys

#: A redelivered message's counter lives this long without news: longer than a message
#: waits for its next delivery after a worker death, a requeue or a broker restart.
PENDING_TTL_S = 3600
#: Once the message is acknowledged, its counter is needed only for a redelivery whose
#: ack was lost: a minute, then it goes.
SETTLED_TTL_S = 60
#: How long a redelivered message waits for the worker's other AMQP runs to finish.
ALONE_WAIT_S = 60.0
#: A header the broker changes from one delivery to the next (quorum queues): not the message's.
BROKER_COUNT_HEADER = "x-delivery-count"


def message_key(message: amqp.Message, prior_deliveries: int) -> str:
    """What tells this message from every other of its queue: its message_id, or a hash of
    its body and properties when it has none; with the deliveries of the copies before it,
    since a retry copy keeps the message_id of the message it replaces."""
    props = message.properties
    identity = props.get("message_id")
    if not identity:
        props = dict(props)
        headers = dict(props.pop("application_headers", None) or {})
        headers.pop(BROKER_COUNT_HEADER, None)
        body = message.body.encode() if isinstance(message.body, str) else bytes(message.body)
        identity = json.dumps([props, headers], sort_keys=True, default=str) + "\0" + body.hex()
    return hashlib.sha256(f"{identity}\0{prior_deliveries}".encode()).hexdigest()[:32]


class DeliveryCounts:
    """The counters of one channel's redelivered messages, in Redis (``amqp_deliveries``):
    a hash per message of ``deliveries`` and ``error``, what failed when esb last put it
    back in its queue itself (for the dead letter it may become). Every call raises
    RedisError when Redis does not answer."""

    def __init__(self, client: redis.Redis, keys: Keys, channel: str):
        self.client = client
        self.keys = keys
        self.channel = channel

    def _key(self, message_key: str) -> str:
        return self.keys.amqp_deliveries(self.channel, message_key)

    def redelivered(self, message_key: str) -> tuple[int, str | None]:
        """Count one more delivery; answer the deliveries counted so far and what failed
        when esb last kept the message, if it did."""
        key = self._key(message_key)
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(key, "deliveries", 1)
        pipe.hget(key, "error")
        pipe.expire(key, PENDING_TTL_S)
        deliveries, error, _ = pipe.execute()
        return int(deliveries), error.decode() if isinstance(error, bytes) else error

    def kept(self, message_key: str, error: str) -> None:
        """The message goes back to its queue, by esb's choice, after ERROR."""
        key = self._key(message_key)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, "error", error)
        pipe.expire(key, PENDING_TTL_S)
        pipe.execute()

    def settled(self, message_key: str) -> None:
        """The message was acknowledged."""
        self.client.expire(self._key(message_key), SETTLED_TTL_S)


class Alone:
    """Runs of AMQP messages in one worker: ``usual()`` ones side by side, ``alone()`` ones
    one at a time with nothing else running (see the module's docstring)."""

    def __init__(self) -> None:
        self._one = Semaphore()
        self._running = 0
        self._closed = False  # while a run alone waits or runs: no usual run starts
        self._open = Event()
        self._open.set()
        self._idle = Event()
        self._usual = _Usual(self)

    def usual(self) -> _Usual:
        # PERF(esb): every message passes here; a generator-based context manager and two
        # Event calls cost 5.6 µs a message, this object 0.8 µs (200,000 runs in a loop).
        return self._usual

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._one:
            self._closed = True
            self._open.clear()
            try:
                if self._running:
                    self._idle.clear()
                    self._idle.wait(ALONE_WAIT_S)
                yield
            finally:
                self._closed = False
                self._open.set()


class _Usual:
    __slots__ = ("runs",)

    def __init__(self, runs: Alone):
        self.runs = runs

    def __enter__(self) -> None:
        runs = self.runs
        while runs._closed:
            runs._open.wait()
        runs._running += 1

    def __exit__(self, *exc_info: object) -> None:
        runs = self.runs
        runs._running -= 1
        if not runs._running and runs._closed:
            runs._idle.set()


#: One per worker: a worker's death ends the messages of all its channels.
RUNS = Alone()
