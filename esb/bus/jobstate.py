"""A scheduled job's state in Redis: the one module that writes it and reads it for others.

Each job has a hash (``Keys.job_state``) and, while a run is in progress, a marker holding
that run's firing id (``Keys.job_inflight``). Every change is a small Lua script below, so
each is atomic and, where it matters, fenced by the scheduler lease. Who writes what:

- the active scheduler (``JobState``): the schedule (``sig``, ``defined_at``,
  ``last_scheduled``, ``paused``, ``resumed_at_ms``), each dispatch (``inflight_entry``,
  ``last_dispatched``, ``dispatched``), ``missed`` and ``next_run``;
- the worker that ran a firing (``record_run``): ``runs``, ``last_run``, ``last_error``...,
  in the transaction that acknowledges the stream entry;
- everyone else reads through ``read_job_facts``, which answers a typed ``JobFacts``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from string import Template
from typing import Any

import redis
from redis.client import Pipeline

from esb.bus.dispatch import DispatchMessage
from esb.bus.keys import Keys
from esb.bus.scripts import LuaScript

UTC = dt.UTC
KEEP = "-"  # as a next_run: "leave next_run as it is"


class Field(StrEnum):
    """The fields of a job's hash; the Lua scripts name them as ``$field``."""

    SIG = "sig"  # digest of the schedule the state belongs to
    SIG_GENERATION = "sig_generation"  # the ODB generation that defined that schedule
    DEFINED_AT = "defined_at"  # when the schedule began (anchors interval times)
    DEFINED_AT_MS = "defined_at_ms"
    LAST_SCHEDULED = "last_scheduled"  # newest firing the cluster handled (run or missed)
    LAST_SCHEDULED_MS = "last_scheduled_ms"
    DISPATCHED = "dispatched"  # scheduled firings dispatched (counts repeats)
    PAUSED = "paused"
    RESUMED_AT_MS = "resumed_at_ms"
    INFLIGHT_ENTRY = "inflight_entry"  # stream entry of the newest dispatched firing
    LAST_DISPATCHED = "last_dispatched"
    LAST_DISPATCHED_FIRING = "last_dispatched_firing"
    MISSED = "missed"
    NEXT_RUN = "next_run"  # "" once the scheduler placed the job and found no fire time
    RUNS = "runs"
    ERRORS = "errors"
    LAST_RUN = "last_run"
    LAST_FIRING_ID = "last_firing_id"
    LAST_DURATION_S = "last_duration_s"
    LAST_ERROR = "last_error"


def _lua(source: str) -> str:
    return Template(source).substitute({field.value: field.value for field in Field})


# Adopt a job's schedule: keep the state when the schedule is unchanged, start it again when
# it changed (unless a scheduler with a newer ODB view already adopted a newer one), re-seed
# it from the caller's memory when Redis lost it. Also records pause and resumption.
_ADOPT = _lua("""
local sig = redis.call('HGET', KEYS[1], '$sig')
local gen = tonumber(redis.call('HGET', KEYS[1], '$sig_generation') or '-1')
if sig ~= ARGV[1] and not (sig and gen > tonumber(ARGV[2])) then
  if (not sig) and ARGV[5] ~= '' then
    redis.call('HSET', KEYS[1], '$defined_at_ms', ARGV[5], '$defined_at', ARGV[6])
    if ARGV[7] ~= '' then
      redis.call('HSET', KEYS[1], '$last_scheduled_ms', ARGV[7], '$last_scheduled', ARGV[8])
    end
  else
    redis.call('HDEL', KEYS[1], '$last_scheduled_ms', '$last_scheduled', '$dispatched',
               '$resumed_at_ms')
    redis.call('HSET', KEYS[1], '$defined_at_ms', ARGV[4], '$defined_at', ARGV[3])
  end
  redis.call('HSET', KEYS[1], '$sig', ARGV[1], '$sig_generation', ARGV[2])
end
local was_paused = redis.call('HGET', KEYS[1], '$paused')
if ARGV[9] == '1' then
  redis.call('HSET', KEYS[1], '$paused', '1')
elseif was_paused == '1' then
  redis.call('HSET', KEYS[1], '$paused', '0', '$resumed_at_ms', ARGV[4])
end
return redis.call('HMGET', KEYS[1], '$defined_at_ms', '$last_scheduled_ms', '$dispatched',
                  '$resumed_at_ms')
""")

# Dispatch one firing, only while holding the lease, only once per firing, only when the
# job's previous run is over, and not past its repeats.
# Returns {outcome, detail, dispatched count}.
_DISPATCH = _lua("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'standby', '', 0} end
local manual = ARGV[3] == ''
if not manual then
  local last = redis.call('HGET', KEYS[2], '$last_scheduled_ms')
  if last and tonumber(last) >= tonumber(ARGV[3]) then return {'duplicate', '', 0} end
  local dispatched = tonumber(redis.call('HGET', KEYS[2], '$dispatched') or '0')
  if ARGV[9] ~= '' and dispatched >= tonumber(ARGV[9]) then return {'done', '', dispatched} end
end
local holder = redis.call('GET', KEYS[3])
if holder then
  if holder == ARGV[2] then return {'duplicate', '', 0} end
  -- Workers delete a stream entry once its run is over: a marker whose entry is gone was
  -- left behind by a run that ended without clearing it.
  local entry = redis.call('HGET', KEYS[2], '$inflight_entry')
  local running = true
  if entry and #redis.call('XRANGE', KEYS[4], entry, entry) == 0 then running = false end
  if running then
    if manual or ARGV[6] == 'wait' then return {'busy', holder, 0} end
    redis.call('HINCRBY', KEYS[2], '$missed', 1)
    redis.call('HSET', KEYS[2], '$last_scheduled_ms', ARGV[3], '$last_scheduled', ARGV[4])
    if ARGV[8] ~= '-' then redis.call('HSET', KEYS[2], '$next_run', ARGV[8]) end
    return {'skipped', holder, 0}
  end
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[5])
local entry = redis.call('XADD', KEYS[4], '*', unpack(ARGV, 10))
redis.call('HSET', KEYS[2], '$inflight_entry', entry, '$last_dispatched', ARGV[7],
           '$last_dispatched_firing', ARGV[2])
local count = 0
if not manual then
  redis.call('HSET', KEYS[2], '$last_scheduled_ms', ARGV[3], '$last_scheduled', ARGV[4])
  count = redis.call('HINCRBY', KEYS[2], '$dispatched', 1)
end
if ARGV[8] ~= '-' then redis.call('HSET', KEYS[2], '$next_run', ARGV[8]) end
return {'dispatched', entry, count}
""")

# Count firings that will not run (late or coalesced), once each, while holding the lease.
_MISSED = _lua("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local last = tonumber(redis.call('HGET', KEYS[2], '$last_scheduled_ms') or '-1')
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
  redis.call('HINCRBY', KEYS[2], '$missed', counted)
  redis.call('HSET', KEYS[2], '$last_scheduled_ms', newest, '$last_scheduled', ARGV[3])
end
return counted
""")

_SET_NEXT_RUN = _lua("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], '$next_run', ARGV[2])
return 1
""")

# Count the run, record its facts, and clear the job's in-flight marker if it is still
# this firing's: only the firing that set the marker may clear it.
_RUN_FINISHED = _lua("""
redis.call('HINCRBY', KEYS[1], '$runs', 1)
redis.call('HSET', KEYS[1], '$last_run', ARGV[2], '$last_firing_id', ARGV[1],
           '$last_duration_s', ARGV[3], '$last_error', ARGV[4])
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[1], '$errors', 1) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
""")

# What a removed job leaves behind: its counters, for whoever looks.
_SCHEDULE_FIELDS = (
    Field.SIG, Field.SIG_GENERATION, Field.DEFINED_AT_MS, Field.DEFINED_AT,
    Field.LAST_SCHEDULED_MS, Field.LAST_SCHEDULED, Field.DISPATCHED, Field.NEXT_RUN,
    Field.PAUSED, Field.RESUMED_AT_MS,
)


def iso(moment: dt.datetime) -> str:
    """UTC, microseconds, 'Z': the one spelling of a time in firing ids and job state."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch_ms(moment: dt.datetime) -> int:
    return round(moment.timestamp() * 1000)


def from_epoch_ms(value: int | str) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(value) / 1000, tz=UTC)


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


def parse_outcome(reply: list) -> Outcome:
    kind, detail, count = reply
    return Outcome(kind=str(kind), detail=str(detail or ""), dispatched=int(count or 0))


class JobState:
    """The scheduler's writes, fenced by the lease INSTANCE holds; every method may raise
    RedisError. With CLIENT a pipeline, a call is queued and answers with the pipeline."""

    def __init__(self, client: redis.Redis, keys: Keys, instance: str, *,
                 inflight_ttl_s: float = 3600.0):
        self.client = client
        self.keys = keys
        self.instance = instance
        self.inflight_ttl_ms = int(inflight_ttl_s * 1000)
        self._adopt = LuaScript(client, _ADOPT)
        self._dispatch = LuaScript(client, _DISPATCH)
        self._missed = LuaScript(client, _MISSED)
        self._set_next_run = LuaScript(client, _SET_NEXT_RUN)

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
        """Where JOB's schedule stands; SEED (what this process last knew) re-creates a state
        Redis lost. Not fenced: a standby keeps its jobs placed too."""
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

    def dispatch(
        self,
        message: DispatchMessage,
        scheduled_at: dt.datetime | None,
        *,
        on_overlap: str,
        next_run: str,
        repeats: int | None = None,
        client: Any = None,
    ) -> Any:
        """Put one firing of ``message.job`` on the stream (SCHEDULED_AT None: a manual one);
        the reply goes through ``parse_outcome``. NEXT_RUN KEEP leaves next_run alone."""
        assert message.job is not None
        job = message.job["name"]
        fields = [item for pair in message.to_fields().items() for item in pair]
        args = [
            self.instance,
            message.job["firing_id"],
            "" if scheduled_at is None else str(epoch_ms(scheduled_at)),
            "" if scheduled_at is None else iso(scheduled_at),
            self.inflight_ttl_ms,
            on_overlap,
            iso(dt.datetime.now(UTC)),
            next_run,
            "" if repeats is None else repeats,
            *fields,
        ]
        keys = [self.keys.scheduler_lease, self.keys.job_state(job),
                self.keys.job_inflight(job), self.keys.dispatch]
        return self._dispatch(keys=keys, args=args, client=client)

    def count_missed(self, job: str, run_times: list[dt.datetime], *, client: Any = None) -> Any:
        """Count RUN_TIMES as missed, each once; answers how many were new, -1 on standby."""
        keys = [self.keys.scheduler_lease, self.keys.job_state(job)]
        args = [self.instance, len(run_times), iso(max(run_times)),
                *(epoch_ms(t) for t in run_times)]
        return self._missed(keys=keys, args=args, client=client)

    def set_next_run(self, job: str, next_run: dt.datetime | None, *, client: Any = None) -> Any:
        """Record JOB's next fire time (None: it has none) if the lease is held (1, else 0)."""
        return self._set_next_run(
            keys=[self.keys.scheduler_lease, self.keys.job_state(job)],
            args=[self.instance, iso(next_run) if next_run else ""], client=client)

    def forget(self, job: str) -> None:
        """A removed job: drop its schedule (a job defined again later starts afresh); keep
        its counters for whoever looks."""
        self.client.hdel(self.keys.job_state(job), *_SCHEDULE_FIELDS)


def record_run(
    pipe: redis.Redis | Pipeline,
    keys: Keys,
    job: str,
    firing_id: str,
    duration_s: float,
    error: str | None,
) -> None:
    """Record one finished run of JOB (by the worker that ran it); on a pipeline, queued.

    PERF(esb): one script call a run, so a worker writes the records of a whole burst of
    firings in the round trip that acknowledges them.
    """
    pipe.eval(_RUN_FINISHED, 2, keys.job_state(job), keys.job_inflight(job), firing_id,
              iso(dt.datetime.now(UTC)), f"{duration_s:.6f}", error or "")


@dataclass(frozen=True)
class JobFacts:
    """What Redis holds about one job, typed; times are ISO strings as stored."""

    name: str
    is_placed: bool  # a scheduler adopted the job's schedule
    defined_at: str | None
    next_run: str | None
    has_no_fire_time: bool  # placed, and the scheduler found no next fire time (or paused)
    last_run: str | None
    last_duration_s: float | None
    last_error: str | None
    runs: int
    missed: int
    errors: int
    dispatched: int

    @classmethod
    def from_hash(cls, name: str, fields: dict[str, str]) -> JobFacts:
        duration = fields.get(Field.LAST_DURATION_S)
        return cls(
            name=name,
            is_placed=bool(fields.get(Field.SIG)),
            defined_at=fields.get(Field.DEFINED_AT) or None,
            next_run=fields.get(Field.NEXT_RUN) or None,
            has_no_fire_time=bool(fields.get(Field.SIG)) and fields.get(Field.NEXT_RUN) == "",
            last_run=fields.get(Field.LAST_RUN) or None,
            last_duration_s=float(duration) if duration else None,
            last_error=fields.get(Field.LAST_ERROR) or None,
            runs=int(fields.get(Field.RUNS, 0)),
            missed=int(fields.get(Field.MISSED, 0)),
            errors=int(fields.get(Field.ERRORS, 0)),
            dispatched=int(fields.get(Field.DISPATCHED, 0)),
        )


def read_job_facts(client: redis.Redis, keys: Keys, names: list[str]) -> list[JobFacts]:
    """The facts of each job in NAMES, in one round trip. Raises RedisError."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.job_state(name))
    return [JobFacts.from_hash(name, fields)
            for name, fields in zip(names, pipe.execute(), strict=True)]
