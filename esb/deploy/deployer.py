"""Hot deploy: validate a file, store it in the ODB as a new version, announce it.

Used by ``esb deploy``, by the pickup watcher and by ``esb start`` for ``config/*.toml``.
Every worker of every server sharing the ODB and Redis switches to the new generation.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.exceptions import RedisError

from esb.bus import Keys
from esb.config import merge_units, parse_unit
from esb.errors import DeployError
from esb.odb import MODULE, UNIT, OdbStore

logger = logging.getLogger(__name__)

VALIDATE_TIMEOUT_S = 30


@dataclass(frozen=True)
class DeployOutcome:
    file: str
    kind: str
    name: str
    version: int
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: deployed {self.kind} {self.name} version {self.version} ({self.detail})"


def validate_module(path: Path) -> list[str]:
    """Import PATH in a separate process; return its service names or raise DeployError."""
    try:
        done = subprocess.run(
            # -P: no module of the working directory shadows one the validator imports.
            [sys.executable, "-P", "-m", "esb.deploy.validate", str(path)],
            capture_output=True,
            text=True,
            timeout=VALIDATE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(path.name, f"importing it took over {VALIDATE_TIMEOUT_S} s") from None
    try:
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        reason = (done.stderr.strip().splitlines() or ["the validator crashed"])[-1]
        raise DeployError(path.name, reason) from None
    if not verdict["ok"]:
        raise DeployError(path.name, verdict["reason"], line=verdict.get("line"))
    return verdict["services"]


class Deployer:
    def __init__(self, odb: OdbStore, client: redis.Redis, keys: Keys):
        self.odb = odb
        self.redis = client
        self.keys = keys

    def deploy(self, path: Path) -> DeployOutcome:
        """Deploy one .py or .toml file; raises DeployError (or ConfigError) on rejection."""
        if path.suffix == ".py":
            outcome = self._deploy_module(path)
        elif path.suffix == ".toml":
            outcome = self._deploy_unit(path.name, self._read(path))
        else:
            raise DeployError(path.name, "only .py service modules and .toml definitions deploy")
        self.announce()
        return outcome

    def deploy_unit_text(self, name: str, text: str) -> DeployOutcome | None:
        """Store a unit unless it is identical to the live version (used at start)."""
        for current in self.odb.current(UNIT):
            if current.name == name and current.content == text:
                return None
        outcome = self._deploy_unit(name, text)
        self.announce()
        return outcome

    def _read(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DeployError(path.name, f"cannot read: {exc}") from None

    def _deploy_module(self, path: Path) -> DeployOutcome:
        services = validate_module(path)
        name = path.stem
        version = self.odb.put(MODULE, name, self._read(path))
        return DeployOutcome(
            path.name, "module", name, version, "services: " + (", ".join(services) or "none")
        )

    def _deploy_unit(self, name: str, text: str) -> DeployOutcome:
        # Check this unit alone, then together with every other live unit: names must be
        # unique across units and references must resolve. Nothing is stored on failure.
        parsed = parse_unit(name, text, environ=None)
        others = [(u.name, u.content) for u in self.odb.current(UNIT) if u.name != name]
        merge_units([*others, (name, text)], environ=None)
        version = self.odb.put(UNIT, name, text)
        counts = ", ".join(f"{len(defs)} {kind}" for kind, defs in sorted(parsed.items()))
        return DeployOutcome(name, "definitions", name, version, counts or "no objects")

    def announce(self) -> None:
        """Tell every worker a new generation is in the ODB; they also poll, so a lost
        notice only delays the switch."""
        try:
            self.redis.publish(self.keys.deploy_channel, str(self.odb.generation()))
        except RedisError as exc:
            logger.warning(
                "deploy stored but not announced (Redis: %s); workers pick it up from the ODB within seconds",
                exc,
            )
