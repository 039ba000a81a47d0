"""The health of a cluster, from the facts its components leave in Redis and the ODB.

``esb status`` and ``GET /esb/status`` both answer with ``collect_status``; a component is
stale when its newest fact is older than it should be, and the cluster is healthy only
when a worker answers, a scheduler is active and nothing is stale or failing. Failing
includes what a deploy left wrong: a worker on another generation than the ODB's for
longer than ``GENERATION_GRACE_S``, a generation a worker could not apply, a version the
server rolled back (until that name is deployed again), and a channel, job or
notification naming a service that a live worker did not load.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import redis
from redis.exceptions import RedisError

from esb.bus import Keys, parse_iso
from esb.bus.jobstate import JobFacts, read_job_facts
from esb.config import Definitions, JobDef, ServerConfig
from esb.deploy.generations import DeployFacts, read_deploy_facts
from esb.errors import OdbUnavailable
from esb.notification.status import dead_letter_problems, notification_problems, notification_rows
from esb.notification.store import NotificationStore
from esb.observe import supervision
from esb.observe.retry import unreachable
from esb.odb import OdbStore, RejectedDeployment
from esb.outgoing.amqp.status import amqp_status
from esb.outgoing.sql import sql_status
from esb.status.readiness import readiness_problems

JOB_GRACE_S = 5.0
# A worker polls the ODB every few seconds: this long on another generation is a problem.
GENERATION_GRACE_S = 10.0


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
                "generation_error": fields.get("generation_error") or None,
                "services": _services_field(fields.get("services")),
                "inflight": int(fields.get("inflight", 0)),
                # A heartbeat without these fields comes from an esb that served whatever it had.
                "ready": fields.get("ready", "1") == "1",
                "build_error": fields.get("build_error") or None,
                "left_out_units": _list_field(fields.get("left_out_units")),
            }
        )
    return sorted(workers, key=lambda w: (w["host"] or "", w["pid"]))


def _services_field(raw: str | None) -> list[str] | None:
    """The service names a worker loaded, from its heartbeat; None when it does not say."""
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        return None
    return sorted(names) if isinstance(names, list) else None


def _list_field(raw: str | None) -> list[str]:
    try:
        values = json.loads(raw or "[]")
    except ValueError:
        return []
    return [str(v) for v in values] if isinstance(values, list) else []


def _job_is_stale(job: JobDef, facts: JobFacts, now: dt.datetime) -> bool:
    """A job is stale when it should have run since its last run (or since it was defined)
    and did not: older than twice its interval plus a grace."""
    if job.paused or job.type == "one_time":
        return False
    if facts.has_no_fire_time:
        return False  # the scheduler placed it and found no further fire time: it is done
    if job.type == "interval":
        age = _age_s(facts.last_run or facts.defined_at, now)
        return age is not None and age > 2 * job.interval_s + JOB_GRACE_S
    overdue = _age_s(facts.next_run, now)
    return overdue is not None and overdue > JOB_GRACE_S


def job_rows(
    client: redis.Redis, keys: Keys, definitions: Definitions, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """One row per defined job, by name: its schedule's facts and whether it is stale.

    Raises RedisError.
    """
    now = now or dt.datetime.now(dt.UTC)
    jobs = sorted(definitions.jobs.values(), key=lambda j: j.name)
    facts = read_job_facts(client, keys, [job.name for job in jobs])
    return [
        {
            "name": job.name,
            "service": job.service,
            "type": job.type,
            "paused": job.paused,
            "next_run": fact.next_run,
            "last_run": fact.last_run,
            "last_duration_s": fact.last_duration_s,
            "runs": fact.runs,
            "missed": fact.missed,
            "last_error": fact.last_error,
            "stale": _job_is_stale(job, fact, now),
        }
        for job, fact in zip(jobs, facts, strict=True)
    ]


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
    return shown | {"instances": instances, "jobs": job_rows(client, keys, definitions, now)}


# -- dispatch: dead letters and worker deaths ---------------------------------------------

# More unasked worker deaths than this in the last minute is a crash loop.
CRASH_LOOP_DEATHS_PER_MIN = 3


def _dispatch(client: redis.Redis, keys: Keys, now: dt.datetime, dead_letters_max: int) -> dict[str, Any]:
    """Messages given up on (how many, since when, against the cap), and workers that died
    without being asked to in the last minute."""
    epoch = now.timestamp()
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.dead_letters)
    pipe.xrange(keys.dead_letters, count=1)
    pipe.zcount(keys.worker_deaths, epoch - 60, "+inf")
    dead_letters, oldest, deaths = pipe.execute()
    oldest_age_s = None
    if oldest:
        entry_id, fields = oldest[0]
        dead_at = float(fields.get("dead_at") or int(entry_id.split("-")[0]) / 1000)
        oldest_age_s = round(max(epoch - dead_at, 0.0), 1)
    return {
        "dead_letters": int(dead_letters),
        "dead_letters_max": dead_letters_max,
        "oldest_dead_letter_age_s": oldest_age_s,
        "worker_deaths_last_min": int(deaths),
    }


def _dispatch_problems(dispatch: dict[str, Any]) -> list[str]:
    problems = []
    if dispatch["dead_letters"]:
        full = (
            f" (at its cap of {dispatch['dead_letters_max']}: the oldest are dropped for new ones)"
            if dispatch["dead_letters"] >= dispatch["dead_letters_max"] else ""
        )
        problems.append(
            f"{dispatch['dead_letters']} dispatch message(s) in the dead-letter stream, the oldest "
            f"{dispatch['oldest_dead_letter_age_s']:.0f} s old{full}; see 'esb dead-letters'"
        )
    if (dispatch["worker_deaths_last_min"] or 0) > CRASH_LOOP_DEATHS_PER_MIN:
        problems.append(f"{dispatch['worker_deaths_last_min']} worker deaths in the last minute")
    return problems


# -- deploys: generations and the services that channels name --------------------------


def _generation_age_s(odb: OdbStore, now: dt.datetime) -> float | None:
    moment = odb.generation_created_at()
    return None if moment is None else (now - moment).total_seconds()


def deploy_problems(
    facts: DeployFacts, generation_age_s: float | None, open_rejections: list[RejectedDeployment]
) -> list[str]:
    """One line per worker that is not on the ODB's generation (past the grace), per
    generation a worker could not apply, and per rollback not yet superseded."""
    problems = []
    for w in facts.workers:
        where = f"worker {w.host}:{w.pid}"
        if w.error:
            problems.append(f"{where} could not apply {w.error}; it serves generation {w.generation}")
        elif w.generation != facts.generation and (
            generation_age_s is None or generation_age_s > GENERATION_GRACE_S
        ):
            problems.append(
                f"{where} serves generation {w.generation}, the ODB is at generation {facts.generation}"
            )
    for r in open_rejections:
        what = "module" if r.kind == "module" else "definitions unit"
        problems.append(
            f"{what} {r.name} version {r.version} was rejected at {r.at}: {r.reason}; "
            f"deploy a fixed version or undeploy it"
        )
    return problems


def service_problems(definitions: Definitions, workers: list[dict[str, Any]]) -> list[str]:
    """One line per channel, job or notification whose service a live worker did not load.

    The workers' heartbeats say what they loaded: the truth of what answers, whatever the
    ODB holds (an ODB file deleted under a running cluster left every channel answering 503).
    """
    loaded = [(w, set(w["services"])) for w in workers if w["alive"] and w["services"] is not None]
    if not loaded:
        return []
    problems = []
    for kind in sorted(definitions.objects):
        for name, obj in sorted(definitions.of(kind).items()):
            service = getattr(obj, "service", None)
            if not service:
                continue
            missing = [w for w, names in loaded if service not in names]
            if not missing:
                continue
            what = f"{kind} {name} ({definitions.unit_of.get((kind, name), '?')})"
            if len(missing) == len(loaded):
                problems.append(f"{what} names service {service}, which is not deployed")
            else:
                where = ", ".join(f"{w['host']}:{w['pid']}" for w in missing)
                problems.append(f"{what} names service {service}, which worker {where} did not load")
    return problems


def collect_status(
    client: redis.Redis,
    keys: Keys,
    config: ServerConfig,
    definitions: Definitions,
    odb: OdbStore | None = None,
) -> dict[str, Any]:
    """Every component's facts and the verdict; Redis down is itself an unhealthy verdict.

    With ODB, what deploys left wrong counts too (``deploy_problems``); an ODB that does
    not answer is then itself a problem.

    The launcher's facts about its children come from a file (esb.observe.supervision), so
    a child that keeps dying is reported even when that child is the embedded Redis.
    """
    now = dt.datetime.now(dt.UTC)
    stale_after_s = config.observe.stale_after_s
    launcher = supervision.read_facts(config.run_dir)
    try:
        workers = _workers(client, keys, stale_after_s, now)
        scheduler = _scheduler(client, keys, definitions, stale_after_s, now)
        dispatch = _dispatch(client, keys, now, config.dispatch.dead_letters_max)
        amqp = amqp_status(client, keys, stale_after_s, now, definitions.of("channel.amqp"))
        notifications = notification_rows(client, keys, definitions, now)
        sql_outconns = sql_status(client, keys, stale_after_s, now)
    except RedisError as exc:
        return {
            "healthy": False,
            "problems": [
                f"{unreachable('Redis', 'status')} ({type(exc).__name__}: {exc})",
                *supervision.problems(launcher),
            ],
            "workers": [],
            "scheduler": None,
            "launcher": launcher,
            "dispatch": None,
            "channels": {"amqp": []},
            "notifications": [],
        }
    problems = []
    if not any(w["alive"] for w in workers):
        problems.append("no worker answers")
    if not scheduler["active"]:
        problems.append("no scheduler is active")
    problems.extend(f"job {j['name']} is stale" for j in scheduler["jobs"] if j["stale"])
    problems.extend(
        f"job {j['name']}: its last run failed: {j['last_error']}"
        for j in scheduler["jobs"]
        if j["last_error"]
    )
    problems.extend(readiness_problems(workers, config))
    problems.extend(service_problems(definitions, workers))
    deploy: dict[str, Any] | None = None
    if odb is not None:
        try:
            facts = read_deploy_facts(odb, client, keys, stale_after_s)
            open_rejections = odb.open_rejections()
            problems.extend(deploy_problems(facts, _generation_age_s(odb, now), open_rejections))
            dead_counts = NotificationStore(odb.engine).dead_letter_counts()
            problems.extend(dead_letter_problems(notifications, dead_counts))
            deploy = {
                "generation": facts.generation,
                "last_good": facts.last_good,
                "open_rejections": [dataclasses.asdict(r) for r in open_rejections],
            }
        except OdbUnavailable as exc:
            problems.append(f"ODB: {exc}")
        except RedisError as exc:
            problems.append(f"{unreachable('Redis', 'status')} ({type(exc).__name__}: {exc})")
    problems.extend(supervision.problems(launcher))
    problems.extend(_dispatch_problems(dispatch))
    problems.extend(amqp["problems"])
    problems.extend(notification_problems(notifications))
    problems.extend(
        f"outconn.sql {o['name']}: the database does not answer ({o['last_error']})"
        for o in sql_outconns
        if o["reachable"] is False
    )
    return {
        "healthy": not problems,
        "problems": problems,
        "cluster": config.main.cluster,
        "checked_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "workers": workers,
        "scheduler": scheduler,
        "launcher": launcher,
        "dispatch": dispatch,
        "deploy": deploy,
        "outconns": {"amqp": amqp["outconns"], "sql": sql_outconns},
        "channels": {"amqp": amqp["channels"]},
        "notifications": notifications,
    }
