"""``outconns.amqp`` of ``esb status``: each live worker's pool facts, from its heartbeat."""

from __future__ import annotations

import datetime as dt
from typing import Any

import redis

from esb.bus import Keys, parse_iso
from esb.outgoing.amqp import HEARTBEAT_FIELD, merge_facts


def amqp_outconn_status(
    client: redis.Redis, keys: Keys, stale_after_s: float, now: dt.datetime
) -> list[dict[str, Any]]:
    """Per ``[[outconn.amqp]]``, the facts of the workers whose heartbeat is fresh; a
    pool no worker has used yet does not appear. Raises RedisError like the rest of status."""
    names = sorted(client.scan_iter(match=keys.worker_heartbeat_pattern, count=500))
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hmget(name, "pid", "last_heartbeat", HEARTBEAT_FIELD)
    live = []
    for pid, last_heartbeat, facts in pipe.execute():
        moment = parse_iso(last_heartbeat)
        if moment is None or (now - moment).total_seconds() >= stale_after_s or not facts:
            continue
        live.append({"pid": pid or "0", HEARTBEAT_FIELD: facts})
    return merge_facts(live)
