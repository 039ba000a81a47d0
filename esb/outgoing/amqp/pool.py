"""``self.out.amqp[name]``: a bounded pool of confirming connections, and send/send_many.

One ``AmqpOutconn`` per ``[[outconn.amqp]]`` in each worker, made on first use. A
connection is checked out by one greenlet at a time (frames of two publishers never
interleave), validated on checkout and replaced when dead; a greenlet drives heartbeats of
the idle ones. Every failure is one ``OutconnError`` subclass that says what happened.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import amqp
import gevent
from gevent.lock import BoundedSemaphore

from esb.config.definitions import AmqpOutconnDef
from esb.config.secrets import masked_url
from esb.errors import (
    AmqpAccessRefused,
    AmqpUnreachable,
    ConfirmTimeout,
    OutconnError,
    PoolExhausted,
    PublishersBlocked,
    PublishNacked,
    SendManyFailed,
    Unroutable,
)
from esb.observe import metrics
from esb.observe.context import current_cid
from esb.observe.retry import Retrying, RetryPolicy
from esb.outgoing.amqp.link import (
    BROKER,
    CHANNEL_ERRORS,
    CONNECTION_ERRORS,
    NACKED,
    REFUSALS,
    RETURNED,
    Link,
    NoConfirm,
    Settled,
    StillBlocked,
)

logger = logging.getLogger(__name__)

#: Reconnecting inside one send: quick at first, never more than 2 s apart.
RECONNECT = RetryPolicy(interval_start_s=0.1, interval_step_s=0.4, interval_max_s=2.0)

# Message properties a send may set (amqp 0-9-1 basic properties, headers apart).
PROPERTIES = frozenset(
    (
        "content_type",
        "content_encoding",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "type",
        "user_id",
        "app_id",
    )
)


class OutconnStats:
    """Counters of one outgoing connection, shown by ``esb status`` per worker."""

    __slots__ = (
        "name",
        "sent",
        "confirmed",
        "nacks",
        "returns",
        "errors",
        "last_error",
        "last_error_at",
        "reachable",
        "blocked_since",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = 0
        self.confirmed = 0
        self.nacks = 0
        self.returns = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.reachable: bool | None = None  # None until the first connection attempt
        # Since when (monotonic) the broker blocks our publishers, as last heard on any
        # connection: it outlives the connection that heard it (a send that failed blocked
        # drops its connection), until a connection hears the block lifted or gets a confirm.
        self.blocked_since: float | None = None

    def block_changed(self, since: float | None) -> None:
        self.blocked_since = since

    def error(self, reason: str) -> None:
        self.errors += 1
        metrics.amqp_messages["outconn.amqp", self.name, "error"] += 1
        self.last_error = reason[:300]
        self.last_error_at = time.time()


def encode(body: Any) -> tuple[bytes, str]:
    """The bytes of BODY and the content type they imply: JSON for a dict or list, UTF-8
    text for a str, bytes as they are."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), "application/octet-stream"
    if isinstance(body, str):
        return body.encode("utf-8"), "text/plain; charset=utf-8"
    if isinstance(body, dict | list):
        return json.dumps(body, separators=(",", ":")).encode("utf-8"), "application/json"
    raise TypeError(f"an AMQP body is a dict, list, str or bytes, not {type(body).__name__}")


class AmqpOutconn:
    """One ``[[outconn.amqp]]`` in this worker: its pool and what services call."""

    def __init__(self, definition: AmqpOutconnDef):
        self.definition = definition
        self.name = definition.name
        self.url = masked_url(definition.url)
        self.stats = OutconnStats(definition.name)
        self._slots = BoundedSemaphore(definition.pool_size)
        self._idle: list[Link] = []
        self._links: set[Link] = set()
        self._retired = False
        self._heartbeats: gevent.Greenlet | None = None

    def __repr__(self) -> str:
        return f"<AmqpOutconn {self.name} {self.url}>"

    # -- the pool -------------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return self.definition.pool_size - self._slots.counter

    @contextmanager
    def connection(self, acquire_timeout_s: float | None = None) -> Iterator[Link]:
        """Check a connection out for this greenlet alone; raises PoolExhausted when none
        is free within ``acquire_timeout_s``, AmqpUnreachable when a new one cannot be made."""
        if self._retired:
            raise OutconnError(self.name, "this definition was replaced or removed by a deploy")
        timeout_s = self.definition.acquire_timeout_s if acquire_timeout_s is None else acquire_timeout_s
        if not self._slots.acquire(timeout=timeout_s):
            self.stats.error("pool exhausted")
            raise PoolExhausted(
                self.name, f"all {self.definition.pool_size} connections busy for {timeout_s:g} s"
            )
        link = None
        try:
            link = self._take()
            yield link
        except BaseException:
            if link is not None:
                self._discard(link)
                link = None
            raise
        finally:
            if link is not None:
                if link.broken or link.pending or self._retired:
                    self._discard(link)
                else:
                    self._idle.append(link)
            self._slots.release()

    def _take(self) -> Link:
        while self._idle:
            link = self._idle.pop()
            if link.is_usable():
                return link
            self._discard(link)
        link = self._connect()
        self._links.add(link)
        self._start_heartbeats()
        return link

    def _failed_within_budget(
        self, exc: BaseException, retrying: Retrying, deadline: float, what: str
    ) -> float:
        """Count EXC against this outconn and answer how long to wait before trying again;
        raises AmqpUnreachable when that wait would pass DEADLINE (the retry budget)."""
        self.stats.reachable = False
        self.stats.error(f"{type(exc).__name__}: {exc}")
        delay_s = retrying.failed(exc)
        if time.monotonic() + delay_s >= deadline:
            raise AmqpUnreachable(
                self.name,
                f"{self.url}: {what} for {self.definition.retry_budget_s:g} s: {type(exc).__name__}: {exc}",
            ) from exc
        return delay_s

    def _connect(self) -> Link:
        """A new connection, retried with backoff for ``retry_budget_s``; a refusal of the
        credentials or the virtual host raises AmqpAccessRefused at once."""
        retrying = Retrying(
            logger, f"outconn.amqp {self.name}: connecting to {self.url}", RECONNECT, service=BROKER
        )
        deadline = time.monotonic() + self.definition.retry_budget_s
        while True:
            try:
                link = Link(self.definition)
            except REFUSALS as exc:
                self.stats.reachable = False
                self.stats.error(f"{type(exc).__name__}: {exc}")
                raise AmqpAccessRefused(self.name, f"{self.url}: the broker refused access: {exc}") from exc
            except Exception as exc:
                gevent.sleep(self._failed_within_budget(exc, retrying, deadline, "unreachable"))
                continue
            retrying.succeeded()
            self.stats.reachable = True
            link.block_changed = self.stats.block_changed
            return link

    def _discard(self, link: Link) -> None:
        link.close()
        self._links.discard(link)

    def _start_heartbeats(self) -> None:
        if self._heartbeats is None and self.definition.heartbeat_s:
            self._heartbeats = gevent.spawn(self._drive_heartbeats)

    def _drive_heartbeats(self) -> None:
        """Idle connections read nothing and send nothing; here they answer the broker's
        heartbeats and send their own, or are found dead and dropped."""
        interval_s = max(self.definition.heartbeat_s / 4, 0.5)
        while not self._retired:
            gevent.sleep(interval_s)
            for link in list(self._idle):
                # Take it as a checkout would, so no greenlet gets it while it ticks.
                if link not in self._idle or not self._slots.acquire(blocking=False):
                    continue
                self._idle.remove(link)
                try:
                    link.tick()
                except Exception as exc:
                    logger.info("outconn.amqp %s: idle connection dropped (%s)", self.name, exc)
                    self._discard(link)
                else:
                    self._idle.append(link)
                finally:
                    self._slots.release()

    def retire(self) -> None:
        """A deploy replaced or removed the definition: close idle connections now and the
        others as they come back."""
        self._retired = True
        for link in self._idle:
            self._discard(link)
        self._idle.clear()
        if self._heartbeats is not None:
            self._heartbeats.kill(block=False)

    # -- sending --------------------------------------------------------------------------

    def _message(self, body: Any, headers: dict | None, properties: dict[str, Any]) -> amqp.Message:
        unknown = set(properties) - PROPERTIES
        if unknown:
            raise TypeError(f"unknown AMQP message properties: {', '.join(sorted(unknown))}")
        d = self.definition
        data, implied_type = encode(body)
        props: dict[str, Any] = {"delivery_mode": d.delivery_mode}
        for name in ("priority", "expiration", "app_id"):
            value = getattr(d, name)
            if value is not None:
                props[name] = value
        props["content_type"] = d.content_type or implied_type
        cid = current_cid.get()
        if cid is not None:
            props["correlation_id"] = cid
        props.update(properties)
        props.setdefault("message_id", os.urandom(16).hex())
        props.setdefault("timestamp", int(time.time()))
        merged = {**d.headers, **headers} if headers else d.headers
        if merged:
            props["application_headers"] = dict(merged)
        return amqp.Message(data, **props)

    def send(
        self,
        body: Any,
        routing_key: str | None = None,
        exchange: str | None = None,
        headers: dict | None = None,
        **properties: Any,
    ) -> str:
        """Publish BODY and return its message_id once the broker confirmed it.

        A broken connection is retried with backoff for ``retry_budget_s`` (the message
        keeps its message_id, so a retry after a lost confirm can be told apart). Raises
        AmqpUnreachable, AmqpAccessRefused (at once), PoolExhausted, PublishNacked,
        ConfirmTimeout, Unroutable (``mandatory``) or PublishersBlocked.
        """
        message = self._message(body, headers, properties)
        message_id = message.properties["message_id"]
        exchange = self.definition.exchange if exchange is None else exchange
        routing_key = self.definition.routing_key if routing_key is None else routing_key
        outcome: list[str | None] = []
        retrying = Retrying(logger, f"outconn.amqp {self.name}: send", RECONNECT, service=BROKER)
        deadline = time.monotonic() + self.definition.retry_budget_s
        while True:
            outcome.clear()
            try:
                with self.connection() as link:
                    link.settled = self._counting(lambda index, mid, error: outcome.append(error))
                    try:
                        self._publish(link, 0, message, exchange, routing_key)
                        link.wait_pending(0)
                    finally:
                        link.settled = _ignore
            except AmqpUnreachable:
                raise  # connecting spent the whole retry budget already
            except CONNECTION_ERRORS as exc:
                # Broken under the publish: the same message again on a new connection.
                gevent.sleep(
                    self._failed_within_budget(exc, retrying, deadline, "connection kept breaking")
                )
                continue
            except CHANNEL_ERRORS as exc:
                self.stats.error(f"{type(exc).__name__}: {exc}")
                raise OutconnError(self.name, f"broker closed the channel: {exc}") from exc
            except (NoConfirm, StillBlocked) as exc:
                raise self._timeout_error(exc) from exc
            retrying.succeeded()
            break
        error = outcome[0] if outcome else None
        if error == RETURNED:
            raise Unroutable(
                self.name,
                f"message {message_id} to exchange {exchange!r} key {routing_key!r} matched no queue",
            )
        if error == NACKED:
            raise PublishNacked(self.name, f"message {message_id} was nacked by the broker")
        return message_id

    def send_many(
        self,
        bodies: Iterable[Any],
        routing_key: str | None = None,
        exchange: str | None = None,
        headers: dict | None = None,
        **properties: Any,
    ) -> int:
        """Publish every body, at most ``window`` unconfirmed at a time, and return how many
        were confirmed, which is all of them; otherwise raise SendManyFailed naming each
        message (index, message_id) not confirmed and the first index never sent.

        Only a connection that fails before the first publish is retried here; after
        that, resending is the caller's choice, with the exact list in hand.
        """
        if "message_id" in properties:
            raise TypeError("send_many makes a message_id per message; do not pass one")
        exchange = self.definition.exchange if exchange is None else exchange
        routing_key = self.definition.routing_key if routing_key is None else routing_key
        window = self.definition.window
        failed: list[tuple[int, str]] = []
        reasons: set[str] = set()
        confirmed = 0

        def settled(index: int, message_id: str, error: str | None) -> None:
            nonlocal confirmed
            if error is None:
                confirmed += 1
            else:
                failed.append((index, message_id))
                reasons.add(error)

        iterator = enumerate(bodies)
        index = next_index = 0
        all_published = False
        error: BaseException | None = None
        with self.connection() as link:
            link.settled = self._counting(settled)
            try:
                for index, body in iterator:
                    next_index = index
                    self._publish(
                        link, index, self._message(body, headers, properties), exchange, routing_key
                    )
                    next_index = index + 1
                    if len(link.pending) >= window:
                        link.wait_pending(window // 2)
                all_published = True
                link.wait_pending(0)
            except Exception as exc:
                # A broken connection, a closed channel, a timeout, or a body that is not
                # a dict, list, str or bytes: the ones before it stand, reported below.
                error = exc
                link.broken = True
            finally:
                # Still pending: published and unanswered, in the queue once or not at all.
                failed.extend(link.pending.values())
                link.pending.clear()
                link.settled = _ignore
        if error is None and not failed:
            return confirmed
        unsent_from = None
        if not all_published:
            failed_at_publish = next_index == index
            if failed_at_publish or next(iterator, None) is not None:
                unsent_from = next_index
        if error is not None:
            self.stats.error(f"{type(error).__name__}: {error}")
            reason = (
                self._timeout_error(error).reason
                if isinstance(error, NoConfirm | StillBlocked)
                else f"{type(error).__name__}: {error}"
            )
            reasons.add(reason)
        failed.sort()
        raise SendManyFailed(self.name, "; ".join(sorted(reasons)), failed, unsent_from, confirmed)

    def _publish(
        self, link: Link, index: int, message: amqp.Message, exchange: str, routing_key: str
    ) -> None:
        link.publish(index, message, exchange, routing_key, self.definition.mandatory)
        self.stats.sent += 1

    def _counting(self, settled: Settled) -> Settled:
        """SETTLED, with this outconn's counters kept on the way."""
        stats = self.stats

        keys = {
            None: ("outconn.amqp", self.name, "confirmed"),
            RETURNED: ("outconn.amqp", self.name, "returned"),
        }
        keys[NACKED] = ("outconn.amqp", self.name, "nacked")

        def counted(index: int, message_id: str, error: str | None) -> None:
            if error is None:
                stats.confirmed += 1
            elif error == RETURNED:
                stats.returns += 1
            elif error == NACKED:
                stats.nacks += 1
            metrics.amqp_messages[keys[error]] += 1
            settled(index, message_id, error)

        return counted

    def _timeout_error(self, exc: NoConfirm | StillBlocked) -> OutconnError:
        if isinstance(exc, StillBlocked):
            self.stats.error("publishers blocked")
            return PublishersBlocked(
                self.name, f"broker blocked publishers for {self.definition.blocked_timeout_s:g} s"
            )
        self.stats.error("confirm timeout")
        return ConfirmTimeout(self.name, f"no confirm within {self.definition.confirm_timeout_s:g} s")

    # -- facts --------------------------------------------------------------------------

    def facts(self) -> dict[str, Any]:
        """What ``esb status`` shows for this pool in this worker."""
        s = self.stats
        return {
            "name": self.name,
            "url": self.url,
            "pool_size": self.definition.pool_size,
            "open": len(self._links),
            "in_use": self.in_use,
            "sent": s.sent,
            "confirmed": s.confirmed,
            "confirms_pending": sum(len(link.pending) for link in self._links),
            "nacks": s.nacks,
            "returns": s.returns,
            "errors": s.errors,
            "last_error": s.last_error,
            "reachable": s.reachable,
            "blocked": self.stats.blocked_since is not None
            or any(link.blocked_since is not None for link in self._links),
        }


def _ignore(index: int, message_id: str, error: str | None) -> None:
    return None
