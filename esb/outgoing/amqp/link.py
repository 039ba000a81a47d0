"""One AMQP connection with one channel in confirm mode, used by one greenlet at a time.

A Link publishes and collects the broker's answers asynchronously: basic.ack and
basic.nack (``multiple`` honoured) and basic.return arrive as channel events while the
link drains the socket, and each settles the message it names. Whoever holds the link
decides how many answers to wait for: ``send`` waits for one, ``send_many`` keeps a window.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import amqp
import gevent
import kombu
from amqp.exceptions import AMQPError

from esb.config.definitions import AmqpOutconnDef

# A broken or refused connection: the link is dead and is replaced.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, amqp.exceptions.ConnectionError)
# The broker closed the channel (no such exchange, a bad property): the link is dropped too.
CHANNEL_ERRORS: tuple[type[BaseException], ...] = (amqp.exceptions.ChannelError,)
LINK_ERRORS = CONNECTION_ERRORS + CHANNEL_ERRORS + (AMQPError,)
# The broker refused the credentials (ACCESS_REFUSED) or the virtual host (NOT_ALLOWED):
# connecting again cannot help until the definition or the broker's users change.
REFUSALS: tuple[type[BaseException], ...] = (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed)
#: What a retry loop names when the broker goes away: "AMQP broker unreachable: ...".
BROKER = "AMQP broker"

CONNECT_TIMEOUT_S = 5.0
# A polite Close waits for the broker's CloseOk, which py-amqp waits for without a limit.
CLOSE_TIMEOUT_S = 5.0

# What a settled message reports: (index in its batch, message_id, None or why it failed).
Settled = Callable[[int, str, str | None], None]
# What the broker last said of publishing: blocked since (monotonic), or None once it took
# messages again.
BlockChanged = Callable[[float | None], None]
NACKED = "nacked by the broker"
RETURNED = "returned unroutable"


class NoConfirm(Exception):
    """The broker confirmed nothing for ``confirm_timeout_s`` (not an OSError: the
    connection may be fine, and retrying would duplicate)."""


class StillBlocked(Exception):
    """The broker kept publishers blocked past ``blocked_timeout_s``."""


class Link:
    """A connected, confirming publisher. Not thread- or greenlet-safe: the pool hands it
    to one greenlet at a time."""

    def __init__(self, definition: AmqpOutconnDef):
        self.definition = definition
        self.blocked_since: float | None = None
        self.block_changed: BlockChanged = _ignore_block
        heartbeat = definition.heartbeat_s or None
        # Named, so the broker's connection list says which outconn of which worker it is.
        client = {"connection_name": f"esb outconn.amqp {definition.name} pid {os.getpid()}"}
        self.conn = kombu.Connection(
            definition.url,
            heartbeat=heartbeat,
            connect_timeout=CONNECT_TIMEOUT_S,
            transport_options={"client_properties": client},
        )
        self.conn.connect()
        self.amqp: amqp.Connection = self.conn.connection
        self.amqp.on_blocked = self._on_blocked
        self.amqp.on_unblocked = self._on_unblocked
        self.channel: amqp.Channel = self.conn.channel()
        self.confirms = definition.confirms
        if self.confirms:
            self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self.next_tag = 1
        # delivery tag -> (index, message_id) of each message published and not yet settled;
        # an OrderedDict so a ``multiple`` ack pops from the front in O(1) per message.
        self.pending: OrderedDict[int, tuple[int, str]] = OrderedDict()
        self.returned: set[str] = set()
        self.settled: Settled = _ignore
        self.last_progress = time.monotonic()
        self.broken = False

    # -- broker events ---------------------------------------------------------------------

    def _on_blocked(self, reason: str) -> None:
        self.blocked_since = time.monotonic()
        self.block_changed(self.blocked_since)

    def _on_unblocked(self) -> None:
        self.blocked_since = None
        self.last_progress = time.monotonic()  # the confirm timeout counts from here again
        self.block_changed(None)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        # A return comes before the ack of the same message; the ack settles it as returned.
        message_id = message.properties.get("message_id")
        if message_id:
            self.returned.add(message_id)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, None)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, NACKED)

    def _settle(self, delivery_tag: int, multiple: bool, error: str | None) -> None:
        self.last_progress = time.monotonic()
        if error is None and self.blocked_since is None:
            self.block_changed(None)  # the broker takes messages: whatever blocked has cleared
        if multiple:
            while self.pending:
                tag = next(iter(self.pending))
                if tag > delivery_tag:
                    break
                self._settle_one(*self.pending.popitem(last=False)[1], error)
        else:
            entry = self.pending.pop(delivery_tag, None)
            if entry is not None:
                self._settle_one(*entry, error)

    def _settle_one(self, index: int, message_id: str, error: str | None) -> None:
        if error is None and message_id in self.returned:
            error = RETURNED
        self.returned.discard(message_id)
        self.settled(index, message_id, error)

    # -- publishing ---------------------------------------------------------------------

    def publish(
        self, index: int, message: amqp.Message, exchange: str, routing_key: str, mandatory: bool
    ) -> None:
        """Publish one message; its answer arrives later through ``settled``."""
        self.wait_unblocked()
        self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        message_id = message.properties["message_id"]
        if self.confirms:
            if not self.pending:
                self.last_progress = time.monotonic()
            self.pending[self.next_tag] = (index, message_id)
            self.next_tag += 1
        else:
            self.settled(index, message_id, None)

    def wait_unblocked(self) -> None:
        """Return once the broker lets publishers through; raise StillBlocked past
        ``blocked_timeout_s`` of one block (StillBlocked)."""
        while self.blocked_since is not None:
            left = self.blocked_since + self.definition.blocked_timeout_s - time.monotonic()
            if left <= 0:
                raise StillBlocked()
            self.drain(min(left, 1.0))

    def wait_pending(self, at_most: int) -> None:
        """Drain answers until at most AT_MOST messages are unconfirmed. Raises NoConfirm
        when the broker confirms nothing for ``confirm_timeout_s``, StillBlocked when it
        blocks publishers for longer than ``blocked_timeout_s`` (a blocked broker does not
        read what was sent, so its silence then is no confirm timeout)."""
        d = self.definition
        while len(self.pending) > at_most:
            now = time.monotonic()
            if self.blocked_since is not None:
                left = self.blocked_since + d.blocked_timeout_s - now
                if left <= 0:
                    raise StillBlocked()
            else:
                left = self.last_progress + d.confirm_timeout_s - now
                if left <= 0:
                    raise NoConfirm()
            self.drain(min(left, self._tick_s()))

    def drain(self, timeout_s: float) -> None:
        """Read what the broker sent within TIMEOUT_S; keep heartbeats going meanwhile."""
        try:
            self.amqp.drain_events(timeout=timeout_s)
        except TimeoutError:
            pass
        self.amqp.heartbeat_tick()

    def _tick_s(self) -> float:
        return max(self.definition.heartbeat_s / 4, 0.5) if self.definition.heartbeat_s else 1.0

    # -- health -------------------------------------------------------------------------

    def is_usable(self) -> bool:
        """Alive as far as a look at the socket can tell: a Close the broker sent, or a
        socket it closed, is read here instead of failing the next publish."""
        if self.broken or not self.amqp.connected or self.channel.connection is None:
            return False
        try:
            self.tick()
        except LINK_ERRORS:
            return False
        return self.amqp.connected and self.channel.is_open

    def tick(self) -> None:
        """Process what arrived (heartbeats, a Close) without waiting; send a heartbeat
        if one is due. Raises LINK_ERRORS when the connection is dead."""
        try:
            self.amqp.drain_events(timeout=0)
        except (TimeoutError, BlockingIOError):
            pass
        self.amqp.heartbeat_tick()

    def close(self) -> None:
        """Close politely when the link works, within CLOSE_TIMEOUT_S; just drop the socket
        when it is broken or blocked: a dead broker never answers the Close, and a broker
        that blocked publishers reads nothing from this connection until the alarm clears
        (a polite Close there held a failed send, and its pool slot, for the whole alarm)."""
        broken, self.broken = self.broken, True
        polite = not broken and self.blocked_since is None and self.amqp.connected
        try:
            if polite:
                with gevent.Timeout(CLOSE_TIMEOUT_S):
                    self.conn.release()
                return
        except (Exception, gevent.Timeout):
            pass  # a half-dead connection fails to close in many ways; its socket goes below
        try:
            self.amqp.collect()
        except Exception:
            pass  # nothing more to free than the socket collect() was dropping


def _ignore(index: int, message_id: str, error: str | None) -> None:
    return None


def _ignore_block(since: float | None) -> None:
    return None
