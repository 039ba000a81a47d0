"""Outgoing AMQP: ``self.out.amqp[name]`` pools with publisher confirms, and the worker's
tables of pools and ``[[channel.amqp]]`` consumers.

kombu and py-amqp are imported by ``esb.outgoing.amqp.pool`` and ``.consumer`` only, and
this module imports those when a definition needs them: a worker of a server without
AMQP definitions does not hold them (``tests/unit/test_worker_imports.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from esb.bus.heartbeat import rows_of
from esb.config.definitions import AmqpOutconnDef

if TYPE_CHECKING:
    from esb.outgoing.amqp.consumer import AmqpChannel
    from esb.outgoing.amqp.pool import AmqpOutconn
    from esb.service import ServiceRuntime

logger = logging.getLogger(__name__)

#: The heartbeat field under which a worker publishes its pools' facts.
HEARTBEAT_FIELD = "outconns_amqp"
#: The heartbeat field under which a worker publishes its AMQP channels' facts.
CHANNELS_FIELD = "channels_amqp"

__all__ = [
    "CHANNELS_FIELD",
    "HEARTBEAT_FIELD",
    "AmqpOutconn",
    "channels_field",
    "heartbeat_field",
    "merge_facts",
    "refresh",
    "refresh_channels",
]


def __getattr__(name: str) -> Any:
    if name == "AmqpOutconn":
        from esb.outgoing.amqp.pool import AmqpOutconn

        return AmqpOutconn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def refresh(
    current: Mapping[str, AmqpOutconn], definitions: Mapping[str, AmqpOutconnDef]
) -> dict[str, AmqpOutconn]:
    """The table for DEFINITIONS: unchanged definitions keep their pool (and its open
    connections); changed or removed ones are retired, closing once their connections
    come back. Nothing connects here: a pool connects on first use."""
    table: dict[str, AmqpOutconn] = {}
    if definitions:
        from esb.outgoing.amqp.pool import AmqpOutconn
    for name, definition in definitions.items():
        old = current.get(name)
        table[name] = old if old is not None and old.definition == definition else AmqpOutconn(definition)
    for name, old in current.items():
        if table.get(name) is not old:
            logger.info("outconn.amqp %s: definition replaced or removed; its pool closes", name)
            old.retire()
    return table


def heartbeat_field(table: Mapping[str, AmqpOutconn]) -> dict[str, str]:
    """This worker's pools' facts, as one heartbeat hash field."""
    return {HEARTBEAT_FIELD: json.dumps([outconn.facts() for outconn in table.values()])}


def refresh_channels(
    current: Mapping[str, AmqpChannel], definitions: Any, runtime: ServiceRuntime, *, stop_timeout_s: float
) -> dict[str, AmqpChannel]:
    """The running channels for DEFINITIONS: unchanged ones keep consuming; changed or
    removed ones stop gracefully in the background while their replacements start."""
    outconns = definitions.of("outconn.amqp")
    table: dict[str, AmqpChannel] = {}
    channels = definitions.of("channel.amqp")
    if channels:
        from esb.outgoing.amqp.consumer import AmqpChannel
    for name, definition in channels.items():
        url = definition.url if definition.outconn is None else outconns[definition.outconn].url
        old = current.get(name)
        if old is not None and old.definition == definition and old.url == url:
            table[name] = old
            continue
        table[name] = AmqpChannel(definition, url, runtime)
        table[name].start()
    for name, old in current.items():
        if table.get(name) is not old:
            import gevent  # CURRENT held a channel: the worker runs gevent already

            logger.info("channel.amqp %s: definition replaced or removed; its consumers stop", name)
            gevent.spawn(old.stop, stop_timeout_s)
    return table


def channels_field(table: Mapping[str, AmqpChannel]) -> dict[str, str]:
    """This worker's AMQP channels' facts, as one heartbeat hash field."""
    return {CHANNELS_FIELD: json.dumps([channel.facts() for channel in table.values()])}


_SUMMED = ("open", "in_use", "sent", "confirmed", "confirms_pending", "nacks", "returns", "errors")


def merge_facts(workers: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Per outgoing connection, the facts of every live worker's heartbeat hash: counters
    summed over workers, the pool size per worker, reachable when every worker that tried
    reached it, blocked when any is blocked, and each worker's own row."""
    merged: dict[str, dict[str, Any]] = {}
    for pid, row in rows_of(workers, HEARTBEAT_FIELD):
        into = merged.setdefault(
            row["name"],
            {
                "name": row["name"],
                "url": row["url"],
                "pool_size": row["pool_size"],
                **{key: 0 for key in _SUMMED},
                "last_error": None,
                "reachable": None,
                "blocked": False,
                "workers": [],
            },
        )
        for key in _SUMMED:
            into[key] += row.get(key, 0)
        if row.get("last_error"):
            into["last_error"] = row["last_error"]
        if row.get("reachable") is not None:
            into["reachable"] = bool(row["reachable"]) and into["reachable"] is not False
        into["blocked"] = into["blocked"] or bool(row.get("blocked"))
        into["workers"].append({"pid": pid, **row})
    return sorted(merged.values(), key=lambda row: row["name"])
