"""The ODB's stored definitions units as they resolve in one process's environment.

A unit passed every check when it was deployed, in the environment of the process that
deployed it. A later start may run in another one (a shell without ``PARTNER_KEY``),
and a cluster peer may deploy a unit naming a variable this server lacks. So:

- ``esb start`` checks every stored unit in its own environment before any worker forks
  (``check_stored_units``, from ``prepare_odb``) and refuses to start, naming the unit,
  the variable and what to do;
- ``esb check-config`` does the same check without starting;
- a worker that meets a unit it cannot resolve anyway serves every other unit
  (``merge_what_resolves``) and names the unit left out in its heartbeat.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from esb.config import Definitions, merge_units
from esb.errors import ConfigError
from esb.odb import UNIT, OdbStore

_UNSET = re.compile(r"environment variable (\w+) is not set")


def merge_what_resolves(
    units: list[tuple[str, str]], *, environ: Mapping[str, str] = os.environ
) -> tuple[Definitions, list[ConfigError]]:
    """The definitions of every unit that merges here, and the error of each unit left
    out: a unit naming a variable this process lacks costs its own objects (and those of
    units that reference them), never every unit's. Workers build no trigger, so none is
    checked."""
    kept = list(units)
    left_out: list[ConfigError] = []
    while True:
        try:
            return merge_units(kept, environ=environ, check_triggers=False), left_out
        except ConfigError as exc:
            if exc.file not in {name for name, _ in kept}:
                raise
            kept = [(name, text) for name, text in kept if name != exc.file]
            left_out.append(exc)


def check_stored_units(
    odb: OdbStore,
    directory: str,
    *,
    environ: Mapping[str, str] = os.environ,
    skip: frozenset[str] = frozenset(),
) -> list[str]:
    """One sentence per stored unit that does not resolve in ENVIRON, saying what to do;
    units named in SKIP (those config/ deploys again at start) are not checked.

    Raises OdbUnavailable.
    """
    units = [(u.name, u.content) for u in odb.current(UNIT) if u.name not in skip]
    _, left_out = merge_what_resolves(units, environ=environ)
    return [unresolved_sentence(exc, directory) for exc in left_out]


def unresolved_sentence(exc: ConfigError, directory: str) -> str:
    """What is wrong with a stored unit and the two ways out."""
    unset = _UNSET.search(exc.reason)
    fix = f"set {unset.group(1)} in the environment of 'esb start'" if unset else "deploy a fixed version"
    return f"{exc}; {fix}, or remove the unit: esb undeploy {directory} {exc.file}"
