"""A job's schedule state in Redis, changed only by small Lua scripts so that each change is
atomic and, where it matters, fenced by the scheduler lease.

Fields of the ``job_state`` hash written here (workers add runs, last_run, last_error...):

- ``sig``, ``sig_generation``: the schedule the state belongs to and the ODB generation
  that defined it; a changed schedule starts again from ``defined_at``.
- ``defined_at`` / ``defined_at_ms``: when the schedule began (anchors interval times).
- ``last_scheduled`` / ``last_scheduled_ms``: scheduled time of the newest firing the
  cluster handled (dispatched, skipped or missed); a restarted scheduler continues after it.
- ``last_dispatched``, ``last_dispatched_firing``, ``inflight_entry``, ``dispatched``.
- ``missed``, ``next_run``, ``paused``, ``resumed_at_ms``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import redis

from esb.bus import DispatchMessage, Keys
from esb.bus.scripts import LuaScript
from esb.scheduler.firings import epoch_ms, from_epoch_ms, iso

KEEP = "-"  # "leave next_run as it is"

# Adopt a job's schedule: keep the state when the schedule is unchanged, start it again when
# it changed (unless a scheduler with a newer ODB view already adopted a newer one), re-seed
# it from the caller's memory when Redis lost it. Also records pause and resumption.
_ADOPT = """
local sig = redis.call('HGET', KEYS[1], 'sig')
local gen = tonumber(redis.call('HGET', KEYS[1], 'sig_generation') or '-1')
if sig ~= ARGV[1] and not (sig and gen > tonumber(ARGV[2])) then
  if (not sig) and ARGV[5] ~= '' then
    redis.call('HSET', KEYS[1], 'defined_at_ms', ARGV[5], 'defined_at', ARGV[6])
    if ARGV[7] ~= '' then
      redis.call('HSET', KEYS[1], 'last_scheduled_ms', ARGV[7], 'last_scheduled', ARGV[8])
    end
  else
    redis.call('HDEL', KEYS[1], 'last_scheduled_ms', 'last_scheduled', 'dispatched',
               'resumed_at_ms')
    redis.call('HSET', KEYS[1], 'defined_at_ms', ARGV[4], 'defined_at', ARGV[3])
  end
  redis.call('HSET', KEYS[1], 'sig', ARGV[1], 'sig_generation', ARGV[2])
end
local was_paused = redis.call('HGET', KEYS[1], 'paused')
if ARGV[9] == '1' then
  redis.call('HSET', KEYS[1], 'paused', '1')
elseif was_paused == '1' then
  redis.call('HSET', KEYS[1], 'paused', '0', 'resumed_at_ms', ARGV[4])
end
return redis.call('HMGET', KEYS[1], 'defined_at_ms', 'last_scheduled_ms', 'dispatched',
                  'resumed_at_ms')
"""

# Dispatch one firing, only while holding the lease, only once per firing, only when the
# job's previous run is over, and not past its repeats.
# Returns {outcome, detail, dispatched count}.
_DISPATCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'standby', '', 0} end
local manual = ARGV[3] == ''
if not manual then
  local last = redis.call('HGET', KEYS[2], 'last_scheduled_ms')
  if last and tonumber(last) >= tonumber(ARGV[3]) then return {'duplicate', '', 0} end
  local dispatched = tonumber(redis.call('HGET', KEYS[2], 'dispatched') or '0')
  if ARGV[9] ~= '' and dispatched >= tonumber(ARGV[9]) then return {'done', '', dispatched} end
end
local holder = redis.call('GET', KEYS[3])
if holder then
  if holder == ARGV[2] then return {'duplicate', '', 0} end
  -- Workers delete a stream entry once its run is over: a marker whose entry is gone was
  -- left behind by a run that ended without clearing it.
  local entry = redis.call('HGET', KEYS[2], 'inflight_entry')
  local running = true
  if entry and #redis.call('XRANGE', KEYS[4], entry, entry) == 0 then running = false end
  if running then
    if manual or ARGV[6] == 'wait' then return {'busy', holder, 0} end
    redis.call('HINCRBY', KEYS[2], 'missed', 1)
    redis.call('HSET', KEYS[2], 'last_scheduled_ms', ARGV[3], 'last_scheduled', ARGV[4])
    if ARGV[8] ~= '-' then redis.call('HSET', KEYS[2], 'next_run', ARGV[8]) end
    return {'skipped', holder, 0}
  end
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[5])
local entry = redis.call('XADD', KEYS[4], '*', unpack(ARGV, 10))
redis.call('HSET', KEYS[2], 'inflight_entry', entry, 'last_dispatched', ARGV[7],
           'last_dispatched_firing', ARGV[2])
local count = 0
if not manual then
  redis.call('HSET', KEYS[2], 'last_scheduled_ms', ARGV[3], 'last_scheduled', ARGV[4])
  count = redis.call('HINCRBY', KEYS[2], 'dispatched', 1)
end
if ARGV[8] ~= '-' then redis.call('HSET', KEYS[2], 'next_run', ARGV[8]) end
return {'dispatched', entry, count}
"""

# Count firings that will not run (late or coalesced), once each, while holding the lease.
_MISSED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_scheduled_ms') or '-1')
local newest = last
local counted = 0
for i = 4, #ARGV do
  local ms = tonumber(ARGV[i])
  if ms > last then
    counted = counted + 1
    if ms > newest then newest = ms end
  end
end
if counted > 0 then
  redis.call('HINCRBY', KEYS[2], 'missed', counted)
  redis.call('HSET', KEYS[2], 'last_scheduled_ms', newest, 'last_scheduled', ARGV[3])
end
return counted
"""

_SET_IF_ACTIVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
"""


@dataclass(frozen=True)
class Adopted:
    """What Redis says about a job's schedule, as the scheduler needs it to place the job."""

    defined_at: dt.datetime
    last_scheduled: dt.datetime | None
    dispatched: int
    resumed_at: dt.datetime | None


@dataclass(frozen=True)
class Outcome:
    """The dispatch script's answer: dispatched, duplicate, skipped, busy, done or standby."""

    kind: str
    detail: str = ""
    dispatched: int = 0


class JobState:
    """The scheduler's view of the ``job_state`` hashes; every method may raise RedisError."""

    def __init__(self, client: redis.Redis, keys: Keys, instance: str):
        self.client = client
        self.keys = keys
        self.instance = instance
        self._adopt = LuaScript(client, _ADOPT)
        self.dispatch_script = LuaScript(client, _DISPATCH)
        self.missed_script = LuaScript(client, _MISSED)
        self._set_if_active = LuaScript(client, _SET_IF_ACTIVE)

    def adopt(
        self,
        job: str,
        signature: str,
        generation: int,
        now: dt.datetime,
        *,
        is_paused: bool,
        seed: Adopted | None = None,
    ) -> Adopted:
        seed_defined = (str(epoch_ms(seed.defined_at)), iso(seed.defined_at)) if seed else ("", "")
        seed_last = (
            (str(epoch_ms(seed.last_scheduled)), iso(seed.last_scheduled))
            if seed and seed.last_scheduled else ("", "")
        )
        defined_ms, last_ms, dispatched, resumed_ms = self._adopt(
            keys=[self.keys.job_state(job)],
            args=[signature, generation, iso(now), epoch_ms(now), *seed_defined, *seed_last,
                  "1" if is_paused else "0"],
        )
        return Adopted(
            defined_at=from_epoch_ms(defined_ms),
            last_scheduled=from_epoch_ms(last_ms) if last_ms else None,
            dispatched=int(dispatched or 0),
            resumed_at=from_epoch_ms(resumed_ms) if resumed_ms else None,
        )

    def dispatch_args(
        self,
        job: str,
        message: DispatchMessage,
        scheduled_at: dt.datetime | None,
        *,
        inflight_ttl_ms: int,
        on_overlap: str,
        next_run: str,
        repeats: int | None = None,
    ) -> tuple[list[str], list]:
        """KEYS and ARGV of the dispatch script for one firing (scheduled_at None: manual)."""
        keys = [self.keys.scheduler_lease, self.keys.job_state(job),
                self.keys.job_inflight(job), self.keys.dispatch]
        fields = [item for pair in message.to_fields().items() for item in pair]
        args = [
            self.instance,
            message.job["firing_id"] if message.job else message.msg_id,
            "" if scheduled_at is None else str(epoch_ms(scheduled_at)),
            "" if scheduled_at is None else iso(scheduled_at),
            inflight_ttl_ms,
            on_overlap,
            iso(dt.datetime.now(dt.UTC)),
            next_run,
            "" if repeats is None else repeats,
            *fields,
        ]
        return keys, args

    def missed_args(self, job: str, run_times: list[dt.datetime]) -> tuple[list[str], list]:
        keys = [self.keys.scheduler_lease, self.keys.job_state(job)]
        return keys, [self.instance, len(run_times), iso(max(run_times)),
                      *(epoch_ms(t) for t in run_times)]

    def set_if_active(self, job: str, *, client: redis.Redis | None = None, **fields: str) -> Any:
        """HSET FIELDS on the job's hash if this instance holds the lease (1, else 0).

        With CLIENT a pipeline, the call is queued and its answer comes with the pipeline's.
        """
        args: list[str] = [self.instance]
        for name, value in fields.items():
            args += [name, value]
        return self._set_if_active(keys=[self.keys.scheduler_lease, self.keys.job_state(job)],
                                   args=args, client=client)

    def forget(self, job: str) -> None:
        """A removed job: drop its schedule (a job defined again later starts afresh); keep
        its counters for whoever looks."""
        self.client.hdel(self.keys.job_state(job), "sig", "sig_generation", "defined_at_ms",
                         "defined_at", "last_scheduled_ms", "last_scheduled", "dispatched",
                         "next_run", "paused", "resumed_at_ms")


def parse_outcome(reply: list) -> Outcome:
    kind, detail, count = reply
    return Outcome(kind=str(kind), detail=str(detail or ""), dispatched=int(count or 0))
