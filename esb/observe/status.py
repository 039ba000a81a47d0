"""The health of a cluster, from the facts its components leave in Redis.

``esb status`` and ``GET /esb/status`` both answer with ``collect_status``; a component is
stale when its newest fact is older than it should be, and the cluster is healthy only
when a worker answers, a scheduler is active and nothing is stale or failing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import redis
from redis.exceptions import RedisError

from esb.bus import Keys, parse_iso
from esb.config import Definitions, JobDef, ServerConfig
from esb.outgoing.amqp.status import amqp_status

JOB_GRACE_S = 5.0


def _age_s(value: str | None, now: dt.datetime) -> float | None:
    moment = parse_iso(value)
    return None if moment is None else (now - moment).total_seconds()


def _scan_hashes(client: redis.Redis, pattern: str) -> list[dict[str, str]]:
    keys = sorted(client.scan_iter(match=pattern, count=500))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return [fields for fields in pipe.execute() if fields]


def _workers(client: redis.Redis, keys: Keys, stale_after_s: float, now: dt.datetime) -> list[dict]:
    workers = []
    for fields in _scan_hashes(client, keys.worker_heartbeat_pattern):
        age = _age_s(fields.get("last_heartbeat"), now)
        workers.append(
            {
                "pid": int(fields.get("pid", 0)),
                "host": fields.get("host"),
                "server": fields.get("server"),
                "alive": age is not None and age < stale_after_s,
                "last_heartbeat": fields.get("last_heartbeat"),
                "started_at": fields.get("started_at"),
                "generation": int(fields.get("generation", -1)),
                "inflight": int(fields.get("inflight", 0)),
            }
        )
    return sorted(workers, key=lambda w: (w["host"] or "", w["pid"]))


def _job_is_stale(job: JobDef, state: dict[str, str], now: dt.datetime) -> bool:
    """A job is stale when it should have run since its last run (or since it was defined)
    and did not: older than twice its interval plus a grace."""
    if job.paused or job.type == "one_time":
        return False
    if state.get("sig") and state.get("next_run") == "":
        return False  # the scheduler placed it and found no further fire time: it is done
    if job.type == "interval":
        reference = state.get("last_run") or state.get("defined_at")
        age = _age_s(reference, now)
        return age is not None and age > 2 * job.interval_s + JOB_GRACE_S
    overdue = _age_s(state.get("next_run"), now)
    return overdue is not None and overdue > JOB_GRACE_S


def _scheduler(
    client: redis.Redis,
    keys: Keys,
    definitions: Definitions,
    stale_after_s: float,
    now: dt.datetime,
) -> dict[str, Any]:
    holder = client.get(keys.scheduler_lease)
    instances = []
    for fields in _scan_hashes(client, keys.scheduler_heartbeat_pattern):
        age = _age_s(fields.get("last_heartbeat"), now)
        alive = age is not None and age < stale_after_s
        instances.append(
            {
                "pid": int(fields.get("pid", 0)),
                "host": fields.get("host"),
                "alive": alive,
                "active": alive and holder is not None and holder == fields.get("instance"),
                "last_heartbeat": fields.get("last_heartbeat"),
            }
        )
    active = next((i for i in instances if i["active"]), None)
    shown = active or (
        instances[0]
        if instances
        else {"pid": None, "host": None, "alive": False, "active": False, "last_heartbeat": None}
    )
    pipe = client.pipeline(transaction=False)
    jobs = sorted(definitions.jobs.values(), key=lambda j: j.name)
    for job in jobs:
        pipe.hgetall(keys.job_state(job.name))
    job_rows = []
    for job, state in zip(jobs, pipe.execute(), strict=True):
        job_rows.append(
            {
                "name": job.name,
                "service": job.service,
                "type": job.type,
                "paused": job.paused,
                "next_run": state.get("next_run") or None,
                "last_run": state.get("last_run") or None,
                "last_duration_s": float(state["last_duration_s"]) if state.get("last_duration_s") else None,
                "runs": int(state.get("runs", 0)),
                "missed": int(state.get("missed", 0)),
                "last_error": state.get("last_error") or None,
                "stale": _job_is_stale(job, state, now),
            }
        )
    return shown | {"instances": instances, "jobs": job_rows}


def collect_status(
    client: redis.Redis, keys: Keys, config: ServerConfig, definitions: Definitions
) -> dict[str, Any]:
    """Every component's facts and the verdict; Redis down is itself an unhealthy verdict."""
    now = dt.datetime.now(dt.UTC)
    stale_after_s = config.observe.stale_after_s
    try:
        workers = _workers(client, keys, stale_after_s, now)
        scheduler = _scheduler(client, keys, definitions, stale_after_s, now)
        amqp = amqp_status(client, keys, stale_after_s, now, definitions.of("channel.amqp"))
    except RedisError as exc:
        return {
            "healthy": False,
            "problems": [f"Redis unreachable: {exc}"],
            "workers": [],
            "scheduler": None,
            "notifications": [],
            "outconns": {"amqp": [], "sql": []},
            "channels": {"amqp": []},
        }
    problems = []
    if not any(w["alive"] for w in workers):
        problems.append("no worker answers")
    if not scheduler["active"]:
        problems.append("no scheduler is active")
    problems.extend(f"job {j['name']} is stale" for j in scheduler["jobs"] if j["stale"])
    problems.extend(amqp["problems"])
    return {
        "healthy": not problems,
        "problems": problems,
        "cluster": config.main.cluster,
        "checked_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "workers": workers,
        "scheduler": scheduler,
        "notifications": [],
        "outconns": {"amqp": amqp["outconns"], "sql": []},
        "channels": {"amqp": amqp["channels"]},
    }
