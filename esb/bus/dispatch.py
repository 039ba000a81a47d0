"""The dispatch stream: asynchronous invocations and scheduler firings, at least once.

Producers append a message to one Redis stream; every worker of the cluster reads it
through one consumer group. A worker that takes a message keeps it fresh while the
service runs (XCLAIM JUSTID resets its idle time); a message whose worker went silent
for ``reclaim_idle_s`` is taken over by another worker with XCLAIM.

A finished message leaves nothing behind: its entry is acknowledged and deleted in one
transaction, so an entry still in the stream and pending is one that has not finished,
and no reclaim can take a finished one. Redis holds per message only its entry while it
is unfinished (bounded by ``max_backlog``) and, if it is given up on, its dead letter
(bounded by ``dead_letters_max``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from esb.bus.keys import Keys
from esb.errors import BusUnavailable


@dataclass(frozen=True)
class DispatchMessage:
    """One unit of work on the stream."""

    msg_id: str
    service: str
    payload: Any
    cid: str
    job: dict | None = None
    enqueued_at: float = 0.0

    def to_fields(self) -> dict[str, str]:
        fields = {
            "id": self.msg_id,
            "service": self.service,
            "payload": json.dumps(self.payload),
            "cid": self.cid,
            "enqueued_at": repr(self.enqueued_at or time.time()),
        }
        if self.job is not None:
            fields["job"] = json.dumps(self.job)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> DispatchMessage:
        job = fields.get("job")
        return cls(
            msg_id=fields["id"],
            service=fields["service"],
            payload=json.loads(fields.get("payload") or "{}"),
            cid=fields.get("cid") or fields["id"],
            job=json.loads(job) if job else None,
            enqueued_at=float(fields.get("enqueued_at") or 0.0),
        )


def new_msg_id() -> str:
    return uuid.uuid4().hex


# Append unless the stream already holds max_backlog unfinished messages: a full backlog
# answers "try later" instead of growing Redis's memory without bound.
_BOUNDED_XADD = """
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('XLEN', KEYS[1]) >= limit then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""


class BacklogFull(BusUnavailable):
    """The dispatch stream holds its configured maximum of unfinished messages."""


def enqueue(
    client: redis.Redis,
    keys: Keys,
    service: str,
    payload: Any,
    *,
    cid: str | None = None,
    msg_id: str | None = None,
    job: dict | None = None,
    max_backlog: int = 0,
) -> str:
    """Append one message to the dispatch stream and return its id.

    Raises BacklogFull when the stream holds ``max_backlog`` unfinished messages (0: no
    limit) and BusUnavailable when Redis cannot take it; the caller decides whether to retry.
    """
    msg_id = msg_id or new_msg_id()
    message = DispatchMessage(
        msg_id=msg_id,
        service=service,
        payload=payload,
        cid=cid or msg_id,
        job=job,
        enqueued_at=time.time(),
    )
    flat = [part for pair in message.to_fields().items() for part in pair]
    try:
        added = client.eval(_BOUNDED_XADD, 1, keys.dispatch, max_backlog, *flat)
    except RedisError as exc:
        raise BusUnavailable(f"cannot enqueue {service}: {exc}") from exc
    if added is None:
        raise BacklogFull(
            f"cannot enqueue {service}: the dispatch backlog is full "
            f"({max_backlog} unfinished messages); try again later"
        )
    return msg_id


def ensure_group(client: redis.Redis, keys: Keys) -> None:
    """Create the stream and its consumer group if they do not exist yet."""
    try:
        client.xgroup_create(keys.dispatch, keys.dispatch_group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def queue_finished(pipe: Pipeline, keys: Keys, entry_ids: list[str]) -> None:
    """Queue on PIPE: acknowledge and delete the finished ENTRY_IDS.

    One XACK and one XDEL serve the whole list. Both in one transaction is what makes a
    run count once without any marker: an acknowledged entry is no longer pending, so no
    consumer can reclaim it, and a deleted one cannot be read again.
    """
    pipe.xack(keys.dispatch, keys.dispatch_group, *entry_ids)
    pipe.xdel(keys.dispatch, *entry_ids)


def finish(client: redis.Redis, keys: Keys, entry_id: str) -> None:
    """Acknowledge and delete one finished entry, in one transaction."""
    pipe = client.pipeline(transaction=True)
    queue_finished(pipe, keys, [entry_id])
    pipe.execute()


# Remove a consumer from the group only while it holds no pending entry and its liveness
# key is missing, in one step: a stopped worker whose blocked read Redis served in the
# meantime holds entries again, and deleting it then would drop them from the pending list
# for good (no consumer would ever be handed them again).
_FORGET_CONSUMER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def forget_consumer(client: redis.Redis, keys: Keys, consumer: str) -> bool:
    """Remove dead CONSUMER from the group if it holds nothing; answers whether it did."""
    return bool(client.eval(_FORGET_CONSUMER, 2, keys.dispatch, keys.consumer_alive(consumer),
                            keys.dispatch_group, consumer))


# -- dead letters: messages given up on after max_deliveries ----------------------------


@dataclass(frozen=True)
class DeadLetter:
    """A message moved out of the dispatch stream: what it was and why it was given up."""

    entry_id: str  # its id in the dead-letter stream
    message: DispatchMessage
    deliveries: int
    last_error: str | None
    dead_at: float


def queue_dead_letter(
    pipe: Pipeline,
    keys: Keys,
    entry_id: str,
    fields: dict[str, str],
    deliveries: int,
    last_error: str | None,
    *,
    max_len: int,
) -> None:
    """Queue on PIPE: copy the dispatch entry to the dead-letter stream with its deliveries
    and last error, then acknowledge and delete it from the dispatch stream.

    The dead-letter stream keeps the newest MAX_LEN: poison arriving faster than an
    operator handles it must not fill Redis. Trimmed exactly: dead letters are rare, and
    the count ``esb status`` shows is then the cap itself.
    """
    dead = dict(fields) | {
        "deliveries": str(deliveries),
        "last_error": last_error or "",
        "dead_at": repr(time.time()),
    }
    pipe.xadd(keys.dead_letters, dead, maxlen=max_len, approximate=False)
    pipe.xack(keys.dispatch, keys.dispatch_group, entry_id)
    pipe.xdel(keys.dispatch, entry_id)


def _dead_letter_of(entry_id: str, fields: dict[str, str]) -> DeadLetter:
    try:
        message = DispatchMessage.from_fields(fields)
    except (KeyError, ValueError):  # a malformed entry that kept killing its workers
        msg_id = fields.get("id") or entry_id
        message = DispatchMessage(msg_id, fields.get("service", "?"), fields.get("payload"), msg_id)
    return DeadLetter(
        entry_id=entry_id,
        message=message,
        deliveries=int(fields.get("deliveries") or 0),
        last_error=fields.get("last_error") or None,
        dead_at=float(fields.get("dead_at") or 0.0),
    )


def dead_letter_count(client: redis.Redis, keys: Keys) -> int:
    return int(client.xlen(keys.dead_letters))


# A stream entry id, whole (ms-seq) or its milliseconds alone; anything else names no entry.
_ENTRY_ID = re.compile(r"[0-9]+(-[0-9]+)?")


def _names_an_entry(entry_id: str) -> bool:
    return _ENTRY_ID.fullmatch(entry_id) is not None


def dead_letters(client: redis.Redis, keys: Keys, count: int = 1000) -> list[DeadLetter]:
    """The oldest COUNT dead letters, oldest first."""
    entries = client.xrange(keys.dead_letters, count=count)
    return [_dead_letter_of(entry_id, fields) for entry_id, fields in entries]


def retry_dead_letter(client: redis.Redis, keys: Keys, entry_id: str) -> str | None:
    """Put dead letter ENTRY_ID back on the dispatch stream as a new delivery, with its
    message id and cid; answers the new dispatch entry id, or None when there is no such
    dead letter. Appending and removing happen in one transaction."""
    if not _names_an_entry(entry_id):
        return None
    found = client.xrange(keys.dead_letters, min=entry_id, max=entry_id, count=1)
    if not found:
        return None
    found_id, found_fields = found[0]
    fields = {
        k: v for k, v in found_fields.items() if k not in ("deliveries", "last_error", "dead_at")
    }
    pipe = client.pipeline(transaction=True)
    pipe.xadd(keys.dispatch, fields)
    pipe.xdel(keys.dead_letters, found_id)  # ENTRY_ID may be its milliseconds alone
    new_entry_id, _deleted = pipe.execute()
    return new_entry_id


def drop_dead_letter(client: redis.Redis, keys: Keys, entry_id: str) -> bool:
    """Remove dead letter ENTRY_ID for good; answers whether it existed."""
    return _names_an_entry(entry_id) and bool(client.xdel(keys.dead_letters, entry_id))
