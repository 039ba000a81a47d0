"""Deploy notices: the one subscription the workers and the scheduler both keep.

A notice says "the ODB has a new generation"; it carries nothing else, so a reader only
needs to know whether one may have come. A notice published while the subscription was
down is not lost that way: (re)subscribing counts as one.
"""

from __future__ import annotations

import logging
import time

import redis
from redis.client import PubSub
from redis.exceptions import RedisError

from esb.bus.keys import Keys
from esb.observe.retry import Retrying

logger = logging.getLogger(__name__)


class DeployNotices:
    """``poll()`` answers whether a deploy may have happened since the last poll; it never
    raises, and resubscribes after an outage at the retry policy's pace."""

    def __init__(self, client: redis.Redis, keys: Keys, reader: str):
        self.client = client
        self.channel = keys.deploy_channel
        self.retrying = Retrying(logger, f"deploy notices of {reader}")
        self._pubsub: PubSub | None = None

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Wait up to TIMEOUT_S for a notice (0: only drain what came); in a gevent worker
        the wait yields, as Redis's socket and ``time.sleep`` are gevent's there."""
        if self._pubsub is None:
            if not self.retrying.is_due():
                time.sleep(min(timeout_s, self.retrying.seconds_until_due()))
                return False
            if not self._subscribe():
                return False
            return True
        try:
            noticed = self._pubsub.get_message(timeout=timeout_s) is not None
            while self._pubsub.get_message(timeout=0) is not None:
                noticed = True
        except RedisError as exc:
            self.close()
            self.retrying.failed(exc)
            return False
        return noticed

    def _subscribe(self) -> bool:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
        except RedisError as exc:
            pubsub.close()
            self.retrying.failed(exc)
            return False
        self._pubsub = pubsub
        self.retrying.succeeded()
        return True

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None
