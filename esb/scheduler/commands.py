"""Manual requests to the active scheduler: ``esb jobs DIR run NAME``.

A request goes on the ``scheduler_commands`` list; only the active scheduler takes it, so
the firing is fenced by the lease and respects a run in progress like any other. The
answer comes back on a per-request list the client waits on. A request nobody took in
time is withdrawn, so it does not fire long after the client gave up.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError

from esb.bus import Keys, utc_now_iso
from esb.errors import BusUnavailable

logger = logging.getLogger(__name__)

REPLY_TTL_S = 60
MAX_PER_TICK = 20


@dataclass(frozen=True)
class Reply:
    """``outcome``: dispatched, busy, unknown_job, standby, timeout or error."""

    outcome: str
    firing_id: str | None = None
    detail: str = ""


def request_run(client: redis.Redis, keys: Keys, job: str, *, timeout_s: float = 10.0) -> Reply:
    """Ask the active scheduler to fire JOB now and wait for its answer.

    Raises BusUnavailable when Redis cannot be reached.
    """
    request_id = uuid.uuid4().hex
    request = json.dumps({"id": request_id, "action": "run", "job": job,
                          "requested_at": utc_now_iso()})
    reply_key = keys.scheduler_reply(request_id)
    try:
        client.rpush(keys.scheduler_commands, request)
        answer = client.blpop([reply_key], timeout=timeout_s)
        if answer is None:
            withdrawn = client.lrem(keys.scheduler_commands, 1, request)
            if withdrawn:
                return Reply("timeout", detail=f"no active scheduler took the request within "
                                               f"{timeout_s:g} s; it was withdrawn")
            return Reply("timeout", detail="the scheduler took the request but did not answer")
    except RedisError as exc:
        raise BusUnavailable(f"cannot reach Redis: {exc}") from exc
    fields = json.loads(answer[1])
    return Reply(fields["outcome"], fields.get("firing_id"), fields.get("detail", ""))


def serve_commands(
    client: redis.Redis, keys: Keys, handle_run: Callable[[str], Reply]
) -> int:
    """Take up to MAX_PER_TICK pending requests, answer each; returns how many were taken.

    Raises RedisError; a request taken but not answered leaves its client to time out.
    """
    taken = 0
    while taken < MAX_PER_TICK:
        raw = client.lpop(keys.scheduler_commands)
        if raw is None:
            break
        taken += 1
        try:
            request = json.loads(raw)
            request_id = request["id"]
            job = request["job"]
        except (ValueError, KeyError, TypeError):
            logger.error("malformed scheduler command dropped: %r", raw[:200])
            continue
        reply = handle_run(job) if request.get("action") == "run" else Reply(
            "error", detail=f"unknown action {request.get('action')!r}")
        reply_key = keys.scheduler_reply(request_id)
        pipe = client.pipeline(transaction=True)
        pipe.rpush(reply_key, json.dumps(
            {"outcome": reply.outcome, "firing_id": reply.firing_id, "detail": reply.detail}))
        pipe.expire(reply_key, REPLY_TTL_S)
        pipe.execute()
    return taken
