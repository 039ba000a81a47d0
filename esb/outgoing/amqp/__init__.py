"""Outgoing AMQP: ``self.out.amqp[name]`` pools with publisher confirms."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from esb.bus.heartbeat import rows_of
from esb.config.definitions import AmqpOutconnDef
from esb.outgoing.amqp.pool import AmqpOutconn

logger = logging.getLogger(__name__)

#: The heartbeat field under which a worker publishes its pools' facts.
HEARTBEAT_FIELD = "outconns_amqp"

__all__ = ["HEARTBEAT_FIELD", "AmqpOutconn", "heartbeat_field", "merge_facts", "refresh"]


def refresh(
    current: Mapping[str, AmqpOutconn], definitions: Mapping[str, AmqpOutconnDef]
) -> dict[str, AmqpOutconn]:
    """The table for DEFINITIONS: unchanged definitions keep their pool (and its open
    connections); changed or removed ones are retired, closing once their connections
    come back. Nothing connects here: a pool connects on first use."""
    table: dict[str, AmqpOutconn] = {}
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
