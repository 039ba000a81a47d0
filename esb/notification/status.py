"""Per notification, what ``esb status`` and ``esb notifications`` show, from Redis facts.

The worker that ran a notification writes its facts (``runner.NotificationRunner._finish``);
the scheduler's job state of the notification's job gives the next run. A notification is
stale when no run completed, and no run in progress delivered a batch, for three intervals
plus a grace (a run draining a backlog goes on for up to 30 s); failing while its last run
failed; either makes the cluster unhealthy while the notification is active. So do its
dead letters, read from the ODB (``dead_letter_problems``), until an operator handles them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import redis

from esb.bus import Keys, parse_iso
from esb.bus.jobstate import read_job_facts
from esb.config import Definitions
from esb.notification import job_name
from esb.notification.runner import notification_key
from esb.notification.store import shown_values

GRACE_S = 5.0


def _int(fields: dict[str, str], key: str) -> int:
    try:
        return int(fields.get(key) or 0)
    except ValueError:
        return 0


def notification_rows(
    client: redis.Redis, keys: Keys, definitions: Definitions, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """One row per defined notification, by name. Raises RedisError."""
    now = now or dt.datetime.now(dt.UTC)
    notes = sorted(definitions.of("notification.sql").values(), key=lambda n: n.name)
    if not notes:
        return []
    pipe = client.pipeline(transaction=False)
    for note in notes:
        pipe.hgetall(notification_key(keys, note.name))
    all_facts = pipe.execute()
    jobs = read_job_facts(client, keys, [job_name(note.name) for note in notes])
    rows = []
    for note, facts, job in zip(notes, all_facts, jobs, strict=True):
        paused = facts.get("paused") == "1"
        active = note.is_active and not paused
        moments = [parse_iso(facts.get(key)) for key in ("last_run", "progress_at")]
        since = max((m for m in moments if m is not None), default=None) or parse_iso(job.defined_at)
        age_s = None if since is None else (now - since).total_seconds()
        stale = active and age_s is not None and age_s > 3 * note.interval_s + GRACE_S
        try:
            watermark = shown_values(facts.get("watermark") or None)
        except (ValueError, KeyError, TypeError):
            watermark = None
        consecutive = _int(facts, "consecutive_failures")
        rows.append({
            "name": note.name,
            "active": active,
            "paused": paused,
            "mode": note.mode,
            "outconn": note.outconn,
            "service": note.service,
            "interval_s": note.interval_s,
            "last_host": facts.get("last_host") or None,
            "last_pid": _int(facts, "last_pid") or None,
            "last_run": facts.get("last_run") or None,
            "last_outcome": facts.get("last_outcome") or None,
            "last_duration_s": float(facts["last_duration_s"]) if facts.get("last_duration_s") else None,
            "last_success": facts.get("last_success") or None,
            "runs": _int(facts, "runs"),
            "rows": _int(facts, "rows"),
            "failures": _int(facts, "failures"),
            "consecutive_failures": consecutive,
            "last_error": facts.get("last_error") or None,
            "watermark": watermark,
            "next_run": job.next_run,
            "stale": stale,
            "failing": active and consecutive > 0,
            "dead_letters": None,  # from the ODB: dead_letter_problems
        })
    return rows


def notification_problems(rows: list[dict[str, Any]]) -> list[str]:
    problems = []
    for row in rows:
        if row["stale"]:
            problems.append(f"notification {row['name']} is stale: no run completed for three intervals")
        elif row["failing"]:
            problems.append(
                f"notification {row['name']} is failing ({row['consecutive_failures']} runs in a row): "
                f"{row['last_error']}"
            )
    return problems


def dead_letter_problems(rows: list[dict[str, Any]], counts: Mapping[str, int]) -> list[str]:
    """One line per notification with dead letters not handled yet (COUNTS, from the ODB),
    defined or not any more; each of ROWS gets its count."""
    for row in rows:
        row["dead_letters"] = counts.get(row["name"], 0)
    return [
        f"notification {name}: {count} dead-lettered batch(es) not handled; see "
        f"'esb notifications DIR failed', then retry or drop them"
        for name, count in sorted(counts.items()) if count
    ]
