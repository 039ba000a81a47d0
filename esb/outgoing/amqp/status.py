"""The AMQP part of ``esb status``: each live worker's pools and channels, from its heartbeat."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import redis

from esb.bus import Keys, parse_iso
from esb.outgoing.amqp import CHANNELS_FIELD, HEARTBEAT_FIELD, merge_facts

_CHANNEL_SUMS = ("consumers_up", "consumers_wanted", "handled", "failed", "dead_lettered")
# Why a worker keeps messages of a channel in its queue: a republish that does not go through.
_CHANNEL_PROBLEMS = ("delay_problem", "dead_letter_problem")


def amqp_status(
    client: redis.Redis, keys: Keys, stale_after_s: float, now: dt.datetime, channels: Mapping[str, Any]
) -> dict[str, list]:
    """``outconns`` (per [[outconn.amqp]] a worker has used), ``channels`` (per deployed
    [[channel.amqp]] CHANNELS) and ``problems``: a channel no live worker consumes for, a
    channel whose copies to its delay queue or dead-letter exchange do not go through (its
    messages are kept in its queue meanwhile), an outconn that cannot connect.
    Raises RedisError like the rest of status."""
    names = sorted(client.scan_iter(match=keys.worker_heartbeat_pattern, count=500))
    live = []
    if names:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, "pid", "last_heartbeat", HEARTBEAT_FIELD, CHANNELS_FIELD)
        for pid, last_heartbeat, outconns, channel_facts in pipe.execute():
            moment = parse_iso(last_heartbeat)
            if moment is None or (now - moment).total_seconds() >= stale_after_s:
                continue
            live.append(
                {"pid": pid or "0", HEARTBEAT_FIELD: outconns or "[]", CHANNELS_FIELD: channel_facts or "[]"}
            )
    rows = {
        name: {
            "name": name,
            "queue": d.queue,
            "service": d.service,
            **dict.fromkeys(_CHANNEL_SUMS, 0),
            "last_message_at": None,
            "last_error": None,
            **dict.fromkeys(_CHANNEL_PROBLEMS),
            "workers": [],
        }
        for name, d in channels.items()
    }
    for fields in live:
        try:
            facts = json.loads(fields[CHANNELS_FIELD])
        except ValueError:
            continue
        for fact in facts:
            row = rows.get(fact["name"])
            if row is None:
                continue  # a worker still at an older generation
            for key in _CHANNEL_SUMS:
                row[key] += fact.get(key, 0)
            if fact.get("last_message_at") and (row["last_message_at"] or 0) < fact["last_message_at"]:
                row["last_message_at"] = fact["last_message_at"]
            for key in ("last_error", *_CHANNEL_PROBLEMS):
                row[key] = fact.get(key) or row[key]
            row["workers"].append({"pid": int(fields["pid"]), **fact})
    problems = [
        f"channel.amqp {name} has no consumer" for name, row in rows.items() if row["consumers_up"] == 0
    ]
    problems += [
        f"channel.amqp {name}: {row[key]}"
        for name, row in rows.items()
        for key in _CHANNEL_PROBLEMS
        if row[key]
    ]
    outconns = merge_facts(live)
    problems += [
        f"outconn.amqp {o['name']}: the broker does not accept a connection ({o['last_error']})"
        for o in outconns
        if o["reachable"] is False
    ]
    return {
        "outconns": outconns,
        "channels": sorted(rows.values(), key=lambda r: r["name"]),
        "problems": problems,
    }
