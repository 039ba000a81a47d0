"""`esb status DIR [--json]`: every component's health; exit 0 only when all are healthy."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from esb.bus import Keys, make_redis
from esb.cli.common import FAILURE, OK, load_or_exit, print_json
from esb.config import Definitions, merge_units
from esb.errors import ConfigError, OdbUnavailable
from esb.odb import UNIT, OdbStore
from esb.status import collect_status


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="show every component's health")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def load_definitions(odb: OdbStore) -> Definitions:
    return merge_units([(u.name, u.content) for u in odb.current(UNIT)], environ=None)


def render_text(status: dict[str, Any]) -> str:
    def mark(ok: bool) -> str:
        return "ok   " if ok else "FAIL "

    lines = [f"{'healthy' if status['healthy'] else 'UNHEALTHY'}"]
    lines += [f"  problem: {p}" for p in status.get("problems", [])]
    for worker in status["workers"]:
        lines.append(
            f"{mark(worker['alive'] and not worker.get('generation_error'))}worker "
            f"{worker['host']}:{worker['pid']} generation {worker['generation']}, "
            f"last heartbeat {worker['last_heartbeat']}"
        )
    scheduler = status.get("scheduler") or {}
    for inst in scheduler.get("instances", []):
        role = "active" if inst["active"] else "standby"
        lines.append(
            f"{mark(inst['alive'])}scheduler {inst['host']}:{inst['pid']} {role} "
            f"last heartbeat {inst['last_heartbeat']}"
        )
    for job in scheduler.get("jobs", []):
        lines.append(
            f"{mark(not job['stale'] and not job['last_error'])}job {job['name']}: "
            f"runs {job['runs']}, missed {job['missed']}, last {job['last_run']}, "
            f"next {job['next_run']}" + (f", error {job['last_error']}" if job["last_error"] else "")
        )
    deploy = status.get("deploy")
    if deploy:
        lines.append(
            f"{mark(not deploy['open_rejections'])}deploy: generation {deploy['generation']}, "
            f"last good {deploy['last_good']}"
        )
    dispatch = status.get("dispatch")
    if dispatch:
        lines.append(
            f"{mark(not dispatch['dead_letters'])}dispatch: {dispatch['dead_letters']} dead letters"
            + (f" (oldest {dispatch['oldest_dead_letter_age_s']:.0f} s ago, "
               f"cap {dispatch['dead_letters_max']})" if dispatch["dead_letters"] else "")
            + f", {dispatch['worker_deaths_last_min']} worker deaths in the last minute"
        )
    for note in status.get("notifications") or []:
        state = "" if note["active"] else (", paused" if note.get("paused") else ", inactive")
        lines.append(
            f"{mark(not note['stale'] and not note['failing'])}notification {note['name']} "
            f"({note['mode']}{state}): runs {note['runs']}, rows {note['rows']}, "
            f"failures {note['failures']}, last {note['last_run']} {note['last_outcome'] or ''}".rstrip()
            + f", next {note['next_run']}"
            + (", STALE" if note["stale"] else "")
            + (f", error {note['last_error']}" if note["failing"] and note["last_error"] else "")
        )
    for sql in (status.get("outconns") or {}).get("sql", []):
        lines.append(
            f"{mark(sql['reachable'] is not False)}outconn.sql {sql['name']} {sql['url']}: "
            f"pool {sql['pool_size']} a worker, checked out {sql['checked_out']}"
            + (f", last error: {sql['last_error']}" if sql["last_error"] else "")
        )
    for pool in (status.get("outconns") or {}).get("amqp", []):
        lines.append(
            f"{mark(pool['reachable'] is not False and not pool['blocked'])}outconn.amqp {pool['name']} "
            f"{pool['url']}: pool {pool['pool_size']} a worker, in use {pool['in_use']} of "
            f"{pool['open']} open, sent {pool['sent']}, pending {pool['confirms_pending']}, "
            f"nacks {pool['nacks']}, returns {pool['returns']}, errors {pool['errors']}"
            + (", BLOCKED" if pool["blocked"] else "")
            + (f", last error: {pool['last_error']}" if pool["last_error"] else "")
        )
    for channel in (status.get("channels") or {}).get("amqp", []):
        kept = channel.get("dead_letter_problem") or channel.get("delay_problem")
        lines.append(
            f"{mark(channel['consumers_up'] > 0 and not kept)}channel.amqp {channel['name']} "
            f"({channel['queue']}): "
            f"{channel['consumers_up']} consumers, handled {channel['handled']}, failed {channel['failed']}, "
            f"dead-lettered {channel['dead_lettered']}, last message {_utc(channel['last_message_at'])}"
            + (f", last error: {channel['last_error']}" if channel.get("last_error") else "")
        )
    return "\n".join(lines)


def _utc(epoch_s: float | None) -> str:
    if epoch_s is None:
        return "never"
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    odb = OdbStore(config.odb_url)
    try:
        definitions = load_definitions(odb)
    except (OdbUnavailable, ConfigError) as exc:
        definitions = Definitions(objects={}, unit_of={})
        odb_problem = f"ODB: {exc}"
    else:
        odb_problem = None
    # No retries and half a staleness period to answer: a Redis slower than that leaves
    # every heartbeat stale anyway, and the operator asking gets the answer within the
    # staleness period (a silent Redis once held this command for 12.8 s).
    timeout_s = max(min(config.redis.socket_timeout_s, config.observe.stale_after_s / 2), 0.5)
    client = make_redis(config.redis_url, socket_timeout_s=timeout_s, max_connections=2)
    status = collect_status(
        client, Keys(config.main.cluster), config, definitions, odb if odb_problem is None else None
    )
    odb.dispose()
    if odb_problem:
        status["healthy"] = False
        status.setdefault("problems", []).append(odb_problem)
    if args.json:
        print_json(status)
    else:
        print(render_text(status))
    return OK if status["healthy"] else FAILURE
