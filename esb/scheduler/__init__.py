"""The scheduler: a sibling process that puts job firings on the Redis dispatch stream.

It never runs service code. ``python -m esb.scheduler DIR`` runs one instance; several
may run against one Redis, and the lease lets exactly one of them dispatch.

Semantics of a ``[[scheduler.job]]``, per job:

- interval: the first run is one interval after the job is defined (or at ``start_date``),
  plus a fixed phase under a second from the job's name, so that the jobs of one deploy
  do not fall due in the same millisecond; the times stay on that grid through restarts,
  failovers and Redis outages.
- cron: a five-field crontab expression read in ``timezone`` (0 or 7 is Sunday).
- one_time: once at ``start_date``. ``repeats = N``: the job is done after N dispatches.
- misfires: firings that fell due while nothing could dispatch them are, within
  ``misfire_grace_s`` (server.conf ``[scheduler] misfire_grace_s``, default 30; a firing
  less than 1 s late is never a misfire), coalesced into one late run
  (``coalesce = false``: each is dispatched in turn, subject to the overlap rule below);
  older ones are skipped. Every due firing that does not run is counted in ``missed``.
- overlap: while the previous run is in progress, ``on_overlap = "skip"`` (default) skips
  the firing and counts it missed; ``"wait"`` keeps it until that run ends (one firing
  waits at most; later ones are skipped and counted).
- ``paused = true``: no firings; resuming continues from then on, not counting the pause.
- a firing's id is ``<job>@<scheduled time>``, the dispatch message id, so a firing runs
  once when nothing failed; ``esb jobs DIR run NAME`` fires ``<job>@manual-<hex>``.

One firing, file by file: ``esb/config/schedule.py`` (the job's trigger) ->
``jobs.py`` (the heap of next fire times, ``JobTable.pop_due``) -> ``process.py``
(``SchedulerProcess.tick``) -> ``dispatcher.py`` (misfire policy, one pipeline) ->
``esb/bus/jobstate.py`` (the fenced dispatch script: lease, de-duplication, overlap,
repeats, the stream entry) -> ``esb/server/consumer.py`` (read, run, acknowledge) ->
``esb/server/worker.py`` (the service; its run recorded by ``jobstate.record_run``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esb.scheduler.commands import Reply, request_run
    from esb.scheduler.firings import firing_id, plan_firings

__all__ = ["Reply", "firing_id", "plan_firings", "request_run"]


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): ``python -m esb.scheduler`` imports this package
    # before its __main__, which must run esb.imports.defer_redis_asyncio() before redis.
    if name in ("Reply", "request_run"):
        from esb.scheduler import commands

        return getattr(commands, name)
    if name in ("firing_id", "plan_firings"):
        from esb.scheduler import firings

        return getattr(firings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
