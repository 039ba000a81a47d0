"""Run records of scheduled jobs, written by whoever learns a fact: workers write runs,
the scheduler writes next runs and misses. One Redis hash per job."""

from __future__ import annotations

import redis

from esb.bus import Keys, utc_now_iso


def job_started(client: redis.Redis, keys: Keys, job: str, firing_id: str) -> None:
    client.hset(keys.job_state(job), mapping={"running_firing": firing_id, "running_since": utc_now_iso()})


def job_finished(
    client: redis.Redis,
    keys: Keys,
    job: str,
    firing_id: str,
    duration_s: float,
    error: str | None,
) -> None:
    """Count the run and clear the job's in-flight marker if it is still this firing's."""
    pipe = client.pipeline(transaction=True)
    state = keys.job_state(job)
    pipe.hincrby(state, "runs", 1)
    pipe.hset(
        state,
        mapping={
            "last_run": utc_now_iso(),
            "last_firing_id": firing_id,
            "last_duration_s": f"{duration_s:.6f}",
            "last_error": error or "",
        },
    )
    pipe.hdel(state, "running_firing", "running_since")
    if error:
        pipe.hincrby(state, "errors", 1)
    # PERF(esb): the compare-and-delete rides in the same round trip as the record.
    pipe.eval(_CLEAR_IF_EQUAL, 1, keys.job_inflight(job), firing_id)
    pipe.execute()


# Compare-and-delete: only the firing that set the marker may clear it.
_CLEAR_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def clear_inflight(client: redis.Redis, keys: Keys, job: str, firing_id: str) -> None:
    client.eval(_CLEAR_IF_EQUAL, 1, keys.job_inflight(job), firing_id)
