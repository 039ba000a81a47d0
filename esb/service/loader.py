"""Turning a module's source into live service classes, and keeping the last good version."""

from __future__ import annotations

import importlib.machinery
import logging
import os
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field

from esb.errors import DeployError
from esb.service.base import Service

logger = logging.getLogger(__name__)


def module_name_of(filename: str) -> str:
    """A module is named after its file: ``orders.py`` is module ``orders``."""
    base = filename.rsplit("/", 1)[-1]
    if not base.endswith(".py") or not base[:-3].isidentifier():
        raise DeployError(filename, "a service module must be a .py file named like a Python module")
    return base[:-3]


def check_module_name(name: str) -> None:
    """Refuse a name that would shadow esb itself, the standard library or an installed package.

    A deployed module is registered in ``sys.modules`` under its name, so ``esb.py`` or
    ``redis.py`` would replace the real package for every later import in the worker.
    Raises DeployError.
    """
    filename = f"{name}.py"
    if name == "esb":
        raise DeployError(filename, f"module name {name!r} is esb's own; rename the file")
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        raise DeployError(filename, f"module name {name!r} is taken by the standard library; rename the file")
    # Only installed locations: the current directory of whoever runs this is no package.
    cwd = os.getcwd()
    paths = [p for p in sys.path if p not in ("", ".", cwd)]
    spec = importlib.machinery.PathFinder.find_spec(name, paths)
    if spec is not None:
        where = spec.origin or next(iter(spec.submodule_search_locations or []), "?")
        raise DeployError(
            filename, f"module name {name!r} is taken by an installed package ({where}); rename the file"
        )


def load_module(name: str, source: str, filename: str) -> types.ModuleType:
    """Compile and execute SOURCE as module NAME; raises DeployError with file and line."""
    module = types.ModuleType(name)
    module.__file__ = filename
    try:
        code = compile(source, filename, "exec")
        # Registered while it executes so dataclasses, pickling and inspect can find it.
        previous = sys.modules.get(name)
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)
        except BaseException:
            if previous is not None:
                sys.modules[name] = previous
            else:
                sys.modules.pop(name, None)
            raise
    except SyntaxError as exc:
        raise DeployError(filename, f"SyntaxError: {exc.msg}", line=exc.lineno) from None
    except Exception as exc:
        raise DeployError(filename, f"{type(exc).__name__}: {exc}", line=_line_in(exc, filename)) from None
    return module


def _line_in(exc: BaseException, filename: str) -> int | None:
    """The deepest line of FILENAME in the traceback: where the module itself failed."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return line


def services_in(module: types.ModuleType) -> dict[str, type[Service]]:
    """The Service subclasses a module defines (not those it imports), by service name."""
    found: dict[str, type[Service]] = {}
    for obj in vars(module).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, Service)
            and obj is not Service
            and obj.__module__ == module.__name__
        ):
            if not obj.name:
                raise DeployError(
                    module.__file__ or module.__name__, f"service class {obj.__name__} has no name"
                )
            if obj.name in found:
                raise DeployError(
                    module.__file__ or module.__name__, f"service name {obj.name!r} is defined twice"
                )
            found[obj.name] = obj
    return found


@dataclass(frozen=True)
class LoadedModule:
    name: str
    version: int
    services: dict[str, type[Service]]


@dataclass(frozen=True)
class StoreState:
    """Loaded modules and the services they define: what ``ServiceStore.install`` swaps in."""

    modules: dict[str, LoadedModule] = field(default_factory=dict)
    services: dict[str, type[Service]] = field(default_factory=dict)


class ServiceStore:
    """Service classes by name, rebuilt from the ODB's modules and swapped whole.

    ``load`` builds a new state without touching the live one, ``install`` swaps it in;
    requests in flight keep the class they started with.
    """

    def __init__(self) -> None:
        self._modules: dict[str, LoadedModule] = {}
        self.services: dict[str, type[Service]] = {}

    def rebuild(self, modules: list[tuple[str, int, str]]) -> None:
        """Load leniently and install: a module that fails keeps its previous version."""
        self.install(self.load(modules, strict=False))

    def install(self, state: StoreState) -> None:
        self._modules = dict(state.modules)
        self.services = dict(state.services)

    def load(
        self,
        modules: list[tuple[str, int, str]],
        *,
        strict: bool,
        before_import: Callable[[str, int], None] | None = None,
    ) -> StoreState:
        """Load every (name, version, source) not loaded yet; drop modules no longer listed.

        STRICT: the first module that fails to load, or a service name two modules define,
        raises DeployError (the caller keeps what it has). Otherwise a failing module keeps
        its previous version and a duplicate service is ignored, both logged.
        BEFORE_IMPORT(name, version) is called just before a module's code runs.
        """
        loaded: dict[str, LoadedModule] = {}
        for name, version, source in modules:
            current = self._modules.get(name)
            if current is not None and current.version == version:
                loaded[name] = current
                continue
            filename = f"{name}.py"
            try:
                check_module_name(name)
                if before_import is not None:
                    before_import(name, version)
                module = load_module(name, source, filename)
                loaded[name] = LoadedModule(name, version, services_in(module))
                logger.info(
                    "module %s version %d loaded: %s",
                    name,
                    version,
                    ", ".join(sorted(loaded[name].services)) or "no services",
                )
            except DeployError as exc:
                if strict:
                    raise
                if current is not None:
                    loaded[name] = current
                logger.error(
                    "module %s version %d not loaded, %s: %s",
                    name,
                    version,
                    "previous version keeps serving" if current else "skipped",
                    exc,
                )
        services: dict[str, type[Service]] = {}
        for module in loaded.values():
            for service_name, cls in module.services.items():
                if service_name in services:
                    if strict:
                        raise DeployError(
                            f"{module.name}.py",
                            f"service {service_name!r} is already defined by module "
                            f"{services[service_name].__module__} ({services[service_name].__module__}.py)",
                        )
                    logger.error(
                        "service %s of module %s ignored: already defined by %s",
                        service_name,
                        module.name,
                        services[service_name].__module__,
                    )
                    continue
                services[service_name] = cls
        return StoreState(loaded, services)
