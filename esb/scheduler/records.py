"""Run records of scheduled jobs, written by whoever learns a fact: workers write runs,
the scheduler writes next runs and misses. One Redis hash per job."""

from __future__ import annotations

import redis
from redis.client import Pipeline

from esb.bus import Keys, utc_now_iso

# Count the run, record its facts, and clear the job's in-flight marker if it is still
# this firing's: only the firing that set the marker may clear it.
_RUN_FINISHED = """
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('HSET', KEYS[1], 'last_run', ARGV[2], 'last_firing_id', ARGV[1],
           'last_duration_s', ARGV[3], 'last_error', ARGV[4])
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], 'errors', 1) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
"""

def job_finished(
    client: redis.Redis | Pipeline,
    keys: Keys,
    job: str,
    firing_id: str,
    duration_s: float,
    error: str | None,
) -> None:
    """Record one finished run of JOB; on a pipeline, the record is queued with its commands.

    PERF(esb): one script call a run, so a worker writes the records of a whole burst of
    firings in the round trip that acknowledges them.
    """
    client.eval(
        _RUN_FINISHED,
        2,
        keys.job_state(job),
        keys.job_inflight(job),
        firing_id,
        utc_now_iso(),
        f"{duration_s:.6f}",
        error or "",
    )
