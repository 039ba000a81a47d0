"""The dispatch stream against real Redis: bounded backlog, message round trip, de-duplication."""

from __future__ import annotations

import pytest

from esb.bus import DispatchMessage, Keys, enqueue, ensure_group
from esb.bus.dispatch import BacklogFull, finish


def test_backlog_is_bounded(redis_client, cluster):
    keys = Keys(cluster)
    for i in range(3):
        enqueue(redis_client, keys, "t.s", {"i": i}, max_backlog=3)
    with pytest.raises(BacklogFull, match="backlog is full"):
        enqueue(redis_client, keys, "t.s", {}, max_backlog=3)
    assert redis_client.xlen(keys.dispatch) == 3


def test_message_round_trip_and_done_marker(redis_client, cluster):
    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    ensure_group(redis_client, keys)  # idempotent
    msg_id = enqueue(
        redis_client,
        keys,
        "t.s",
        {"a": [1, 2]},
        cid="c1",
        job={"name": "j", "firing_id": "j@1", "scheduled_at": "2030-01-01T00:00:00Z"},
    )
    [[_stream, [(entry_id, fields)]]] = redis_client.xreadgroup(
        keys.dispatch_group, "me", {keys.dispatch: ">"}, count=1
    )
    message = DispatchMessage.from_fields(fields)
    assert (message.msg_id, message.service, message.payload, message.cid) == (
        msg_id,
        "t.s",
        {"a": [1, 2]},
        "c1",
    )
    assert message.job["firing_id"] == "j@1"
    finish(redis_client, keys, entry_id)
    assert redis_client.xlen(keys.dispatch) == 0
    assert redis_client.xpending(keys.dispatch, keys.dispatch_group)["pending"] == 0
