"""Hot deploy: validate a change as the workers will apply it, store it as a new generation,
announce it.

Used by ``esb deploy``, ``esb undeploy``, the pickup watcher and ``esb start`` for
``config/*.toml``. A change is checked together with everything else the ODB holds: every
definition unit merged (``$ENV{...}`` resolved in the server's environment), every module
imported in a process started like a worker, no service name defined twice, every service
a channel, job or notification names defined by a module. What fails is rejected with file,
line or key and reason, and nothing is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.exceptions import RedisError

from esb.bus import Keys
from esb.config import Definitions, ServerConfig, merge_units, parse_unit
from esb.errors import ConfigError, DeployError
from esb.notification.keyset import deploy_problem
from esb.notification.store import NotificationStore
from esb.odb import MODULE, UNIT, OdbStore
from esb.service.loader import module_name_of

logger = logging.getLogger(__name__)

# The import limit when no server.conf is at hand: half of the default [main] timeout_s.
DEFAULT_IMPORT_LIMIT_S = 15.0
# Kinds whose objects name a service, and the key that does.
SERVICE_USERS = ("channel.http", "scheduler.job", "notification.sql")


def import_limit_s(timeout_s: float) -> float:
    """How long the imports of a deploy may take: half of ``[main] timeout_s``, so that a
    worker importing the same modules is never killed by the arbiter for it."""
    return max(1.0, timeout_s / 2)


@dataclass(frozen=True)
class DeployOutcome:
    file: str
    kind: str
    name: str
    version: int
    detail: str

    def __str__(self) -> str:
        verb = "undeployed" if self.detail == "removed" else "deployed"
        return f"{self.file}: {verb} {self.kind} {self.name} version {self.version} ({self.detail})"


def validate_module(path: Path, *, environ: Mapping[str, str] | None = None,
                    limit_s: float = DEFAULT_IMPORT_LIMIT_S) -> list[str]:
    """Import PATH alone in a validating process; its service names, or DeployError."""
    from esb.deploy.validate import validate_modules

    name = module_name_of(path.name)
    source = _read(path)
    verdict = validate_modules(
        [(name, source)], environ=os.environ if environ is None else environ, limit_s=limit_s
    ).get(name)
    if verdict is None:
        raise DeployError(path.name, "the validator gave no verdict")
    if verdict.error is not None:
        raise DeployError(path.name, verdict.error, line=verdict.line)
    return list(verdict.services)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DeployError(path.name, f"cannot read: {exc}") from None


class Deployer:
    """Checks and stores changes. ENVIRON is the server's environment (the one workers
    resolve ``$ENV{...}`` in and import modules with); IMPORT_LIMIT_S bounds the imports."""

    def __init__(
        self,
        odb: OdbStore,
        client: redis.Redis,
        keys: Keys,
        *,
        environ: Mapping[str, str] | None = None,
        import_limit_s: float = DEFAULT_IMPORT_LIMIT_S,
        cwd: Path | None = None,
    ):
        self.odb = odb
        self.redis = client
        self.keys = keys
        self.environ = dict(os.environ if environ is None else environ)
        self.import_limit_s = import_limit_s
        self.cwd = cwd

    @classmethod
    def for_server(
        cls,
        config: ServerConfig,
        odb: OdbStore,
        client: redis.Redis,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> Deployer:
        """A deployer for the server of CONFIG: its cluster, its import limit, ENVIRON (by
        default this process's, right for the server's own processes)."""
        return cls(
            odb,
            client,
            Keys(config.main.cluster),
            environ=environ,
            import_limit_s=import_limit_s(config.main.timeout_s),
            cwd=config.directory,
        )

    # -- the three changes -------------------------------------------------------------

    def deploy(self, path: Path) -> DeployOutcome:
        """Deploy one .py or .toml file; raises DeployError (or ConfigError) on rejection."""
        return self.deploy_text(path.name, _read(path))

    def deploy_text(self, filename: str, text: str) -> DeployOutcome:
        """Deploy the content of a file named FILENAME; nothing is written on rejection."""
        if filename.endswith(".py"):
            outcome = self._deploy_module(filename, text)
        elif filename.endswith(".toml"):
            outcome = self._deploy_unit(filename, text)
        else:
            raise DeployError(filename, "only .py service modules and .toml definitions deploy")
        self.announce()
        return outcome

    def deploy_unit_text(self, name: str, text: str) -> DeployOutcome | None:
        """Store a unit unless it is identical to the live version (used at start).

        Only the definitions are checked, merged with every other unit: config/ is the
        server's own, a module that no longer imports must not keep the server from
        starting (workers then stay on the last good generation), and a channel whose
        service is not deployed yet answers 503 until it is.
        """
        for current in self.odb.current(UNIT):
            if current.name == name and current.content == text:
                return None
        parsed = parse_unit(name, text, environ=self.environ)
        self._check_watermarks(name, parsed)
        units = {u.name: u.content for u in self.odb.current(UNIT)}
        units.pop(name, None)
        merge_units([*sorted(units.items()), (name, text)], environ=self.environ)
        version = self.odb.put(UNIT, name, text)
        self.announce()
        return DeployOutcome(name, "definitions", name, version, _counts(parsed))

    def undeploy(self, name: str) -> DeployOutcome:
        """Remove a module (``orders``, ``orders.py``) or a unit (``orders.toml``).

        Refused, with what still points at it, when the rest would not validate.
        """
        kind, stored = self._resolve(name)
        before = {m.name: m.content for m in self.odb.current(MODULE)}
        modules = dict(before)
        units = {u.name: u.content for u in self.odb.current(UNIT)}
        (modules if kind == MODULE else units).pop(stored)
        what = f"{stored}.py" if kind == MODULE else stored
        try:
            if kind == MODULE:
                self._check(modules, units, changed=None, before=before)
            else:
                # Taking objects away leaves no service unnamed; merging checks the rest.
                self._check(modules, units, changed=None, changed_unit="")
        except (ConfigError, DeployError) as exc:
            raise DeployError(what, f"cannot be undeployed, the rest would not apply: {exc}") from None
        version = self.odb.put(kind, stored, "", is_deleted=True)
        self.announce()
        return DeployOutcome(what, "module" if kind == MODULE else "definitions", stored, version, "removed")

    # -- checks ------------------------------------------------------------------------

    def _resolve(self, name: str) -> tuple[str, str]:
        modules = {m.name for m in self.odb.current(MODULE)}
        units = {u.name for u in self.odb.current(UNIT)}
        if name.endswith(".py") and name[:-3] in modules:
            return MODULE, name[:-3]
        if name.endswith(".toml") and name in units:
            return UNIT, name
        if name in modules:
            return MODULE, name
        if f"{name}.toml" in units:
            return UNIT, f"{name}.toml"
        raise DeployError(name, "no module or definitions unit of that name is deployed")

    def _deploy_module(self, filename: str, text: str) -> DeployOutcome:
        name = module_name_of(filename)
        before = {m.name: m.content for m in self.odb.current(MODULE)}
        modules = before | {name: text}
        units = {u.name: u.content for u in self.odb.current(UNIT)}
        owners = self._check(modules, units, changed=name, before=before)
        services = sorted(s for s, owner in owners.items() if owner == name)
        version = self.odb.put(MODULE, name, text)
        detail = "services: " + (", ".join(services) or "none")
        return DeployOutcome(filename, "module", name, version, detail)

    def _deploy_unit(self, name: str, text: str) -> DeployOutcome:
        parsed = parse_unit(name, text, environ=self.environ)
        self._check_watermarks(name, parsed)
        modules = {m.name: m.content for m in self.odb.current(MODULE)}
        units = {u.name: u.content for u in self.odb.current(UNIT)}
        units[name] = text
        self._check(modules, units, changed=None, changed_unit=name)
        version = self.odb.put(UNIT, name, text)
        return DeployOutcome(name, "definitions", name, version, _counts(parsed))

    def _check_watermarks(self, unit: str, parsed: Mapping[str, list]) -> None:
        """A notification whose stored watermark was stored for another query or other
        columns (deployed before under the same name) is refused unless its ``on_change``
        says what to do: going on from it would skip rows of the new query."""
        notes = [note for note in parsed.get("notification.sql", []) if note.watermark]
        if not notes:
            return
        states = NotificationStore(self.odb.engine).states()
        for note in notes:
            state = states.get(note.name)
            problem = None if state is None else deploy_problem(note, state.watermark_of, state.watermark)
            if problem is not None:
                raise ConfigError(unit, f"notification.sql.{note.name}.{problem[0]}", problem[1])

    def _check(
        self,
        modules: dict[str, str],
        units: dict[str, str],
        *,
        changed: str | None,
        changed_unit: str | None = None,
        before: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """Validate the whole set as workers will load it; the module owning each service.

        CHANGED is the module being deployed, CHANGED_UNIT the unit; BEFORE, for a change
        of modules, the modules the ODB holds now. Raises ConfigError (definitions) or
        DeployError (modules) on the first problem.
        """
        # The changed unit merges last, so a clash names it rather than the unit it clashes with.
        merge_order = sorted(units.items(), key=lambda unit: (unit[0] == changed_unit, unit[0]))
        definitions = merge_units(merge_order, environ=self.environ)
        from esb.deploy.validate import sql_driver_problem, validate_modules

        for name, outconn in definitions.of("outconn.sql").items():
            unit = definitions.unit_of[("outconn.sql", name)]
            if unit == changed_unit and (problem := sql_driver_problem(outconn.url)):
                raise ConfigError(unit, f"outconn.sql.{name}.url", problem)

        verdicts = validate_modules(
            sorted(modules.items()), environ=self.environ, limit_s=self.import_limit_s, cwd=self.cwd
        )
        order = sorted(modules, key=lambda m: (m != changed, m))
        for name in order:
            verdict = verdicts.get(name)
            if verdict is None:
                raise DeployError(f"{name}.py", "the validator gave no verdict")
            if verdict.error is not None:
                reason = verdict.error
                if name != changed:
                    reason = f"(deployed earlier) no longer imports in the server's environment: {reason}"
                raise DeployError(f"{name}.py", reason, line=verdict.line)
        owners: dict[str, str] = {}
        # Modules already deployed own their services; the changed one comes last, so a
        # clash names it as the one taking a name over.
        for name in sorted(modules, key=lambda m: (m == changed, m)):
            for service in verdicts[name].services:
                other = owners.get(service)
                if other is not None:
                    raise DeployError(
                        f"{name}.py",
                        f"service {service!r} is already defined by module {other} ({other}.py); "
                        f"{name}.py may not define it too",
                    )
                owners[service] = name
        # A service named by a channel, job or notification must be defined, for the
        # objects this change adds or modules it changes. A dangling name that was there
        # before (config/ at start, a rollback) answers 503 and does not block every deploy.
        missing = _missing_services(definitions, owners, only_unit=changed_unit)
        if missing and before is not None:
            was = self._owners_leniently(before)
            missing = [m for m in missing if m[2] in was]  # only what this change takes away
        if missing:
            unit, key, service = missing[0]
            raise ConfigError(unit, key, f"no deployed module defines service {service!r}")
        return owners

    def _owners_leniently(self, modules: dict[str, str]) -> dict[str, str]:
        """Service -> module of the modules that import, ignoring those that do not."""
        from esb.deploy.validate import validate_modules

        owners: dict[str, str] = {}
        verdicts = validate_modules(
            sorted(modules.items()), environ=self.environ, limit_s=self.import_limit_s, cwd=self.cwd
        )
        for name, verdict in sorted(verdicts.items()):
            for service in verdict.services:
                owners.setdefault(service, name)
        return owners

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


def _counts(parsed: Mapping[str, list]) -> str:
    return ", ".join(f"{len(defs)} {kind}" for kind, defs in sorted(parsed.items())) or "no objects"


def _missing_services(
    definitions: Definitions, owners: Mapping[str, str], *, only_unit: str | None = None
) -> list[tuple[str, str, str]]:
    """(unit, key, service) of every channel, job or notification naming a service no module
    defines; with ONLY_UNIT, of that unit's objects only."""
    missing = []
    for kind in SERVICE_USERS:
        for name, obj in sorted(definitions.of(kind).items()):
            unit = definitions.unit_of[(kind, name)]
            if obj.service not in owners and (only_unit is None or unit == only_unit):
                missing.append((unit, f"{kind}.{name}.service", obj.service))
    return missing

