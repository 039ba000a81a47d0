"""A worker's consumer of the dispatch stream: read, run, acknowledge, reclaim.

Three loops, each in its own greenlet: ``read_loop`` takes new messages while the pool has
room; ``keepalive_loop`` resets the idle time of the messages this worker is running, so
nobody reclaims them; ``reclaim_loop`` takes over messages whose worker went silent
(killed, hung, stopped) for longer than ``reclaim_idle_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
import redis
from gevent.pool import Pool
from redis.exceptions import RedisError, ResponseError

from esb.bus import DispatchMessage, Keys, ensure_group
from esb.bus.dispatch import finish, is_done
from esb.config.server_conf import DispatchSection
from esb.observe.outage import OutageNotice

logger = logging.getLogger(__name__)

# A scheduler fires many jobs in the same millisecond; read a burst in few round trips.
READ_BATCH = 64
BLOCK_MS = 1000


class DispatchConsumer:
    def __init__(
        self,
        *,
        client: redis.Redis,
        reader: redis.Redis,
        keys: Keys,
        consumer_name: str,
        settings: DispatchSection,
        run: Callable[[DispatchMessage], None],
    ):
        self.client = client
        self.reader = reader
        self.keys = keys
        self.consumer_name = consumer_name
        self.settings = settings
        self.run = run
        self.pool = Pool(settings.concurrency)
        self.inflight: dict[str, str] = {}  # stream entry id -> message id
        self.processed = 0
        self.failed = 0
        self._greenlets: list[gevent.Greenlet] = []
        self._running = False

    def start(self) -> None:
        self._running = True
        self._greenlets = [
            gevent.spawn(self.read_loop),
            gevent.spawn(self.keepalive_loop),
            gevent.spawn(self.reclaim_loop),
        ]

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking work and give running messages TIMEOUT_S to finish; the rest is
        left pending and will be reclaimed by another worker."""
        self._running = False
        gevent.killall(self._greenlets, block=True, timeout=2)
        self.pool.join(timeout=timeout_s)

    def read_loop(self) -> None:
        outage = OutageNotice(logger, "dispatch read")
        has_group = False
        while self._running:
            try:
                if not has_group:
                    ensure_group(self.client, self.keys)
                    has_group = True
                if self.pool.free_count() == 0:
                    self.pool.wait_available(timeout=1)
                    continue
                batch = self.reader.xreadgroup(
                    self.keys.dispatch_group,
                    self.consumer_name,
                    {self.keys.dispatch: ">"},
                    count=min(self.pool.free_count(), READ_BATCH),
                    block=BLOCK_MS,
                )
                outage.succeeded()
            except RedisError as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    has_group = False  # Redis lost the group (restart without persistence)
                delay_s = outage.backoff_s()
                outage.failed(exc, delay_s)
                gevent.sleep(delay_s)
                continue
            for _stream, entries in batch or []:
                self.submit_batch(entries)

    def submit_batch(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Check a whole read batch against the done-markers in one round trip, then run it.

        PERF(esb): a scheduler fires hundreds of jobs in the same millisecond; one EXISTS
        round trip per message delayed the start of the last service of a burst.
        """
        try:
            pipe = self.client.pipeline(transaction=False)
            for _entry_id, fields in entries:
                pipe.exists(self.keys.done(fields.get("id", "")))
            done_flags: list[bool | None] = [bool(flag) for flag in pipe.execute()]
        except RedisError:
            done_flags = [None] * len(entries)  # each message checks for itself
        for (entry_id, fields), is_known_done in zip(entries, done_flags, strict=True):
            self.submit(entry_id, fields, is_known_done)

    def submit(self, entry_id: str, fields: dict[str, str], is_known_done: bool | None = None) -> None:
        self.inflight[entry_id] = fields.get("id", entry_id)
        self.pool.spawn(self._process, entry_id, fields, is_known_done)

    def _process(self, entry_id: str, fields: dict[str, str], is_known_done: bool | None) -> None:
        try:
            try:
                message = DispatchMessage.from_fields(fields)
            except (KeyError, ValueError) as exc:
                logger.error("dispatch entry %s is malformed (%s); dropping it", entry_id, exc)
                self._ack_malformed(entry_id)
                return
            if is_known_done is None:
                is_known_done = is_done(self.client, self.keys, message.msg_id)
            if is_known_done:
                logger.info(
                    "message %s for %s already ran; acknowledging the redelivery",
                    message.msg_id,
                    message.service,
                )
            else:
                self.run(message)
                self.processed += 1
            finish(self.client, self.keys, entry_id, message.msg_id, self.settings.done_ttl_s)
        except RedisError as exc:
            # Left pending: this worker or another one takes it again once Redis answers.
            self.failed += 1
            logger.warning("dispatch entry %s not acknowledged (%s); it will be redelivered", entry_id, exc)
        finally:
            self.inflight.pop(entry_id, None)

    def _ack_malformed(self, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.dispatch, self.keys.dispatch_group, entry_id)
        pipe.xdel(self.keys.dispatch, entry_id)
        pipe.execute()

    def keepalive_loop(self) -> None:
        interval_s = max(self.settings.reclaim_idle_s / 3, 0.2)
        while self._running:
            gevent.sleep(interval_s)
            if not self.inflight:
                continue
            try:
                # Only refresh entries still ours: one reclaimed while we were silent stays
                # with the worker that took it.
                pending = self.client.xpending_range(
                    self.keys.dispatch,
                    self.keys.dispatch_group,
                    min="-",
                    max="+",
                    count=max(len(self.inflight), 1) * 2,
                    consumername=self.consumer_name,
                )
                ours = [p["message_id"] for p in pending if p["message_id"] in self.inflight]
                if ours:
                    self.client.xclaim(
                        self.keys.dispatch,
                        self.keys.dispatch_group,
                        self.consumer_name,
                        min_idle_time=0,
                        message_ids=ours,
                        justid=True,
                    )
            except RedisError as exc:
                logger.debug("dispatch keepalive failed (%s); retrying", exc)

    def reclaim_loop(self) -> None:
        idle_ms = int(self.settings.reclaim_idle_s * 1000)
        interval_s = max(self.settings.reclaim_idle_s / 2, 0.25)
        while self._running:
            gevent.sleep(interval_s)
            free = self.pool.free_count()
            if free == 0:
                continue
            try:
                reply = self.client.xautoclaim(
                    self.keys.dispatch,
                    self.keys.dispatch_group,
                    self.consumer_name,
                    min_idle_time=idle_ms,
                    start_id="0-0",
                    count=free,
                )
            except RedisError as exc:
                logger.debug("dispatch reclaim failed (%s); retrying", exc)
                continue
            for entry_id, fields in reply[1]:
                if entry_id in self.inflight:
                    continue
                if not fields:
                    continue  # deleted while pending: nothing left to run
                logger.warning(
                    "reclaimed message %s for %s from a worker silent for over %.1f s",
                    fields.get("id"),
                    fields.get("service"),
                    self.settings.reclaim_idle_s,
                )
                self.submit(entry_id, fields)


def consumer_name(host: str, pid: int) -> str:
    return f"{host}:{pid}:{int(time.time())}"
