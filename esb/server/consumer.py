"""A worker's consumer of the dispatch stream: read, run, acknowledge, reclaim.

Three loops, each in its own greenlet: ``read_loop`` takes new messages while the pool has
room; ``finish_loop`` acknowledges finished messages, together with their run records, in
one transaction for all that finished since its last round trip; ``reclaim_loop`` takes
over messages whose consumer's liveness key is gone. That key is refreshed by a native
thread (``esb.server.liveness``), not a greenlet: a service that holds the loop for a
while keeps its messages, and only a worker that is dead, stopped or killed by the
arbiter's timeout loses them (the key must stay missing for two beats, so a Redis restart
that lost it is not mistaken for a death). A message whose deliveries (reclaims included) pass
``max_deliveries`` has killed its workers that often: it goes to the dead-letter stream
instead of running again. A dead consumer is removed from the group once it holds nothing.

Runs once without remembering finished messages: an entry is acknowledged and deleted in
one transaction, so what a reclaim takes has not finished, and an entry a read handed this
worker is one it may run as long as it is still pending here.

PERF(esb): a scheduler fires hundreds of jobs in the same millisecond. Round trips are
paid per batch rather than per message, so the last service of a burst starts soon after
the first: one to read, one to acknowledge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import redis
from gevent.event import Event
from gevent.pool import Pool
from redis.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from esb.bus import DispatchMessage, Keys, ensure_group
from esb.bus.dispatch import forget_consumer, queue_dead_letter, queue_finished
from esb.config.server_conf import DispatchSection
from esb.observe.retry import Retrying
from esb.server.liveness import NativeLiveness

logger = logging.getLogger(__name__)

READ_BATCH = 64
BLOCK_MS = 1000
# The finisher writes at most once in this long: a worker taking a message a millisecond
# acknowledges them ten at a time instead of one by one, for the CPU of services.
ACK_PACING_S = 0.01
READ_LINGER_S = 0.003

# Runs a message's service; answers the error text, or None when it succeeded.
RunMessage = Callable[[DispatchMessage], "str | None"]
# Queues on the pipeline what a finished run leaves behind (a job's run record).
RecordRun = Callable[[Pipeline, DispatchMessage, float, "str | None"], None]


@dataclass
class Finished:
    """A message done with on this worker and not acknowledged yet."""

    entry_id: str
    message: DispatchMessage | None = None  # None: malformed, only acknowledged
    ran: bool = False
    duration_s: float = 0.0
    error: str | None = None


class DispatchConsumer:
    def __init__(
        self,
        *,
        client: redis.Redis,
        reader: redis.Redis,
        keys: Keys,
        consumer_name: str,
        settings: DispatchSection,
        run: RunMessage,
        record: RecordRun | None = None,
        redis_url: str,
        counts_own_attempts: Callable[[DispatchMessage], bool] | None = None,
    ):
        self.client = client
        # Messages whose runner counts attempts and dead-letters on its own (a notification
        # with max_attempts): a reclaim runs them again past max_deliveries, so one fault
        # leaves one dead letter, the runner's, and not a second one here.
        self.counts_own_attempts = counts_own_attempts
        self.reader = reader
        self.keys = keys
        self.consumer_name = consumer_name
        self.settings = settings
        self.run = run
        self.record = record
        self.pool = Pool(settings.concurrency)
        # Stream entry id -> message id, from reading to acknowledging.
        self.inflight: dict[str, str] = {}
        self.finished: list[Finished] = []
        self._finished_added = Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._finisher: gevent.Greenlet | None = None
        self._running = False
        self._nothing_more_to_finish = False
        # Consumer name -> when its liveness key was first seen missing (monotonic).
        self._missing_since: dict[str, float] = {}
        self.liveness = NativeLiveness(
            redis_url,
            keys.consumer_alive(consumer_name),
            ttl_s=settings.reclaim_idle_s,
            interval_s=max(settings.reclaim_idle_s / 4, 0.1),
        )

    def start(self) -> None:
        self._running = True
        # Before the first read: a consumer is never without its key while it holds work.
        try:
            self.client.set(self.liveness.key, "1", px=self.liveness.ttl_ms)
        except RedisError as exc:
            logger.warning("dispatch liveness not set yet (%s); the liveness thread retries", exc)
        self.liveness.start()
        self._greenlets = [
            gevent.spawn(self.read_loop),
            gevent.spawn(self.reclaim_loop),
        ]
        self._finisher = gevent.spawn(self.finish_loop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking work, give running messages TIMEOUT_S to finish and acknowledge what
        finished; the rest is left pending and will be reclaimed by another worker."""
        self._running = False
        gevent.killall(self._greenlets, block=True, timeout=2)
        self.pool.join(timeout=timeout_s)
        self._nothing_more_to_finish = True
        self._finished_added.set()  # wake the finisher: it ends once it has written the rest
        if self._finisher is not None:
            self._finisher.join(timeout=2)
            self._finisher.kill(block=True, timeout=1)
        # What is left pending may be reclaimed at once rather than after the key's TTL.
        self.liveness.stop()
        try:
            self.client.delete(self.liveness.key)
        except RedisError as exc:
            logger.debug("dispatch liveness key not deleted (%s); it expires", exc)

    def read_loop(self) -> None:
        retrying = Retrying(logger, f"dispatch read of {self.consumer_name}")
        has_group = False
        while self._running:
            try:
                if not has_group:
                    ensure_group(self.client, self.keys)
                    has_group = True
                if self.pool.free_count() == 0:
                    self.pool.wait_available(timeout=1)
                    continue
                asked = time.monotonic()
                batch = self.reader.xreadgroup(
                    self.keys.dispatch_group,
                    self.consumer_name,
                    {self.keys.dispatch: ">"},
                    count=min(self.pool.free_count(), READ_BATCH),
                    block=BLOCK_MS,
                )
                retrying.succeeded()
            except RedisError as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    has_group = False  # Redis lost the group (restart without persistence)
                gevent.sleep(retrying.failed(exc))
                continue
            for _stream, entries in batch or []:
                self.submit_read(entries, time.monotonic() - asked)
            if batch:
                gevent.sleep(READ_LINGER_S)

    def submit(self, entry_id: str, fields: dict[str, str]) -> None:
        """Run the entry in the pool."""
        self.inflight[entry_id] = fields.get("id", entry_id)
        self.pool.spawn(self._process, entry_id, fields)

    def _process(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            message = DispatchMessage.from_fields(fields)
        except (KeyError, ValueError) as exc:
            logger.error("dispatch entry %s is malformed (%s); dropping it", entry_id, exc)
            self._finish(Finished(entry_id))
            return
        started = time.monotonic()
        error = self.run(message)
        duration_s = time.monotonic() - started
        self._finish(Finished(entry_id, message, ran=True, duration_s=duration_s, error=error))

    def _finish(self, finished: Finished) -> None:
        self.finished.append(finished)
        self._finished_added.set()

    def _leave_pending(self, entry_id: str, exc: RedisError) -> None:
        """This worker or another one takes the entry again once Redis answers."""
        self.inflight.pop(entry_id, None)
        logger.warning("dispatch entry %s not acknowledged (%s); it will be redelivered", entry_id, exc)

    def finish_loop(self) -> None:
        """Acknowledge what finished, with its run records, one transaction a round trip.

        Whatever finishes while a transaction is under way, or in the ACK_PACING_S after
        it, goes into the next one: a burst is acknowledged in a few round trips, and a
        lone message without delay.
        """
        retrying = Retrying(logger, f"dispatch acknowledgement of {self.consumer_name}")
        while self.finished or not self._nothing_more_to_finish:
            self._finished_added.wait()
            self._finished_added.clear()
            batch, self.finished = self.finished, []
            if not batch:
                continue
            try:
                self._acknowledge(batch, retrying)
            except Exception:
                # A fault in a run record must not end acknowledgements for good: these
                # entries go back to the stream's pending list and are reclaimed.
                logger.exception("acknowledging %d dispatch entries failed", len(batch))
                for finished in batch:
                    self.inflight.pop(finished.entry_id, None)
            gevent.sleep(ACK_PACING_S)

    def _acknowledge(self, batch: list[Finished], retrying: Retrying) -> None:
        """Retry while Redis is unreachable: the services ran, and running them again because
        Redis was briefly away is what at-least-once allows but nobody wants."""
        while True:
            try:
                self._write_finished(batch)
            except ResponseError as exc:
                # A refused command (a run record of the wrong type, say) is a fault that
                # retrying cannot mend; an entry left unacknowledged is reclaimed later.
                logger.error("acknowledging %d dispatch entries: %s", len(batch), exc)
            except RedisError as exc:
                if not self._running:
                    for finished in batch:
                        self._leave_pending(finished.entry_id, exc)
                    return
                gevent.sleep(retrying.failed(exc))
                continue
            retrying.succeeded()
            for finished in batch:
                self.inflight.pop(finished.entry_id, None)
            return

    def _write_finished(self, batch: list[Finished]) -> None:
        taken = self._taken_over(batch)
        batch = [finished for finished in batch if finished.entry_id not in taken]
        if not batch:
            return
        pipe = self.client.pipeline(transaction=True)
        if self.record is not None:
            for finished in batch:
                if finished.ran and finished.message is not None:
                    self.record(pipe, finished.message, finished.duration_s, finished.error)
        queue_finished(pipe, self.keys, [finished.entry_id for finished in batch])
        pipe.execute()

    def _taken_over(self, batch: list[Finished]) -> set[str]:
        """Entries of BATCH that another consumer reclaimed while this worker was silent
        (stopped, or hung past ``reclaim_idle_s``) and still holds: their run goes on there.
        This worker leaves them alone: acknowledging one would delete the entry and clear
        its job's in-flight marker under the run that took over, and the scheduler would
        then start the job's next firing beside that run (overlap).

        Only a run that lasted ``reclaim_idle_s`` can have been reclaimed (the monotonic
        clock runs on while a process is stopped), so a short one costs no round trip.
        """
        suspects = [f.entry_id for f in batch if f.ran and f.duration_s >= self.settings.reclaim_idle_s]
        holders = self._holders(suspects)
        taken = {entry_id for entry_id, holder in holders.items()
                 if holder is not None and holder != self.consumer_name}
        for entry_id in taken:
            logger.warning("dispatch entry %s was reclaimed by consumer %s while this worker was silent; "
                           "its run there goes on; this one is not acknowledged", entry_id, holders[entry_id])
        return taken

    def _holders(self, entry_ids: list[str]) -> dict[str, str | None]:
        """The consumer each of ENTRY_IDS is pending with now; None: pending nowhere, which
        means acknowledged (it finished, or was dead-lettered)."""
        if not entry_ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self.keys.dispatch, self.keys.dispatch_group, min=entry_id, max=entry_id,
                                count=1)
        return {entry_id: str(pending[0]["consumer"]) if pending else None
                for entry_id, pending in zip(entry_ids, pipe.execute(), strict=True)}

    def submit_read(self, entries: list[tuple[str, dict[str, str]]], waited_s: float) -> None:
        """Run what one XREADGROUP answered after WAITED_S.

        Entries new to the group never ran (only the scheduler's firings share ids, and its
        dispatch script adds a firing once), unless this worker was stopped while its read
        was blocked: Redis handed it the entries then, and another consumer may have
        reclaimed them since. After such a wait, only the entries still pending here run:
        one another consumer holds is left to it, and one pending nowhere was acknowledged
        meanwhile (it ran and finished there, or was dead-lettered).
        """
        is_stale = waited_s > BLOCK_MS / 1000 + self.settings.reclaim_idle_s
        holders = self._holders([entry_id for entry_id, _ in entries]) if is_stale else {}
        for entry_id, fields in entries:
            holder = holders.get(entry_id, self.consumer_name)
            if holder == self.consumer_name:
                self.submit(entry_id, fields)
            elif holder is None:
                logger.info("dispatch entry %s was finished elsewhere while this worker was silent; "
                            "not run again", entry_id)
            else:
                logger.warning("dispatch entry %s was reclaimed by consumer %s while this worker was "
                               "silent; left to it", entry_id, holder)

    def reclaim_loop(self) -> None:
        interval_s = max(self.settings.reclaim_idle_s / 2, 0.25)
        while self._running:
            gevent.sleep(interval_s)
            free = self.pool.free_count()
            if free == 0:
                continue
            try:
                self.reclaim(free)
            except RedisError as exc:
                logger.debug("dispatch reclaim failed (%s); retrying", exc)

    def reclaim(self, limit: int) -> int:
        """Take over up to LIMIT messages held by consumers whose liveness key is gone, and
        entries of this consumer left unacknowledged after a Redis error (pending here but no
        longer in ``inflight``); answer how many were taken (run here or dead-lettered).
        A dead consumer that holds nothing (any more) is removed from the group.

        XCLAIM with a minimum idle time settles races between reclaimers: the first resets
        the idle time, the others then claim nothing.
        """
        consumers = self.client.xinfo_consumers(self.keys.dispatch, self.keys.dispatch_group)
        others = [c for c in consumers if c["name"] != self.consumer_name]
        pipe = self.client.pipeline(transaction=False)
        for other in others:
            pipe.exists(self.keys.consumer_alive(other["name"]))
        alive = pipe.execute() if others else []
        dead = self._confirmed_dead(others, alive)
        self._forget([c["name"] for c in dead if not int(c["pending"])])
        candidates = [c for c in dead if int(c["pending"])]
        candidates += [c for c in consumers if c["name"] == self.consumer_name and int(c["pending"])]
        idle_ms = int(self.settings.reclaim_idle_s * 1000)
        taken = 0
        for holder_row in candidates:
            if taken >= limit:
                break
            holder = holder_row["name"]
            is_ours = holder == self.consumer_name
            pending = self.client.xpending_range(
                self.keys.dispatch,
                self.keys.dispatch_group,
                min="-",
                max="+",
                count=limit - taken,
                consumername=holder,
                idle=idle_ms,
            )
            if is_ours:
                pending = [p for p in pending if p["message_id"] not in self.inflight]
            if not pending:
                continue
            deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
            claimed = self.client.xclaim(
                self.keys.dispatch,
                self.keys.dispatch_group,
                self.consumer_name,
                min_idle_time=idle_ms,
                message_ids=list(deliveries),
            )
            for entry_id, fields in claimed:
                if entry_id in self.inflight or not fields:
                    continue  # not fields: deleted while pending, nothing left to run
                taken += 1
                # XCLAIM counted this delivery too.
                self._take_over(entry_id, fields, deliveries[entry_id] + 1, holder)
        return taken

    def _forget(self, dead: list[str]) -> None:
        """Remove the DEAD consumers from the group (each only while it still holds nothing):
        a group that keeps every consumer that ever was grows with every worker restart."""
        for name in dead:
            if forget_consumer(self.client, self.keys, name):
                self._missing_since.pop(name, None)
                logger.info("dispatch consumer %s is gone and held nothing; removed from the group", name)

    def _counts_own_attempts(self, fields: dict[str, str]) -> bool:
        if self.counts_own_attempts is None:
            return False
        try:
            return self.counts_own_attempts(DispatchMessage.from_fields(fields))
        except (KeyError, ValueError):
            return False  # malformed: dispatch's own count decides

    def _confirmed_dead(self, holders: list[dict], alive: list[int]) -> list[dict]:
        """The HOLDERS whose liveness key has been missing for at least two of their beats.

        A key missing once may be a Redis that just restarted and lost it (it was expiring
        while Redis was down) before the consumer's thread set it again; its messages are
        still running. Two beats later a live consumer has its key back.
        """
        now = time.monotonic()
        grace_s = 2 * self.liveness.interval_s
        missing = {h["name"] for h, is_alive in zip(holders, alive, strict=True) if not is_alive}
        for name in list(self._missing_since):
            if name not in missing:
                del self._missing_since[name]
        dead = []
        for holder in holders:
            if holder["name"] in missing:
                since = self._missing_since.setdefault(holder["name"], now)
                if now - since >= grace_s:
                    dead.append(holder)
        return dead

    def _take_over(self, entry_id: str, fields: dict[str, str], deliveries: int, holder: str) -> None:
        """Run a reclaimed message again, or dead-letter it once its deliveries pass the limit."""
        if deliveries <= self.settings.max_deliveries or self._counts_own_attempts(fields):
            logger.warning(
                "reclaimed message %s for %s from consumer %s (delivery %d of %d)",
                fields.get("id"),
                fields.get("service"),
                holder,
                deliveries,
                self.settings.max_deliveries,
            )
            self.submit(entry_id, fields)
            return
        msg_id = fields.get("id")
        last_error = (
            f"delivered {deliveries - 1} times without finishing; its last worker (consumer "
            f"{holder}) died or stopped while holding it"
        )
        pipe = self.client.pipeline(transaction=True)
        queue_dead_letter(pipe, self.keys, entry_id, fields, deliveries - 1, last_error,
                          max_len=self.settings.dead_letters_max)
        pipe.execute()
        logger.error(
            "message %s for %s moved to the dead-letter stream: %s; see 'esb dead-letters'",
            msg_id,
            fields.get("service"),
            last_error,
            extra={"cid": fields.get("cid"), "service": fields.get("service")},
        )


def consumer_name(host: str, pid: int) -> str:
    return f"{host}:{pid}:{int(time.time())}"
