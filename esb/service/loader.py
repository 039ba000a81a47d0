"""Turning a module's source into live service classes, and keeping the last good version."""

from __future__ import annotations

import logging
import sys
import traceback
import types
from dataclasses import dataclass

from esb.errors import DeployError
from esb.service.base import Service

logger = logging.getLogger(__name__)


def module_name_of(filename: str) -> str:
    """A module is named after its file: ``orders.py`` is module ``orders``."""
    base = filename.rsplit("/", 1)[-1]
    if not base.endswith(".py") or not base[:-3].isidentifier():
        raise DeployError(filename, "a service module must be a .py file named like a Python module")
    return base[:-3]


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


class ServiceStore:
    """Service classes by name, rebuilt from the ODB's modules and swapped whole.

    A module version that fails to load here keeps its previous version serving; requests in
    flight keep the class they started with.
    """

    def __init__(self) -> None:
        self._modules: dict[str, LoadedModule] = {}
        self.services: dict[str, type[Service]] = {}

    def rebuild(self, modules: list[tuple[str, int, str]]) -> None:
        """Load every (name, version, source) not loaded yet; drop modules no longer listed."""
        loaded: dict[str, LoadedModule] = {}
        for name, version, source in modules:
            current = self._modules.get(name)
            if current is not None and current.version == version:
                loaded[name] = current
                continue
            filename = f"{name}.py"
            try:
                module = load_module(name, source, filename)
                loaded[name] = LoadedModule(name, version, services_in(module))
                logger.info(
                    "module %s version %d loaded: %s",
                    name,
                    version,
                    ", ".join(sorted(loaded[name].services)) or "no services",
                )
            except DeployError as exc:
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
                    logger.error(
                        "service %s of module %s ignored: already defined by %s",
                        service_name,
                        module.name,
                        services[service_name].__module__,
                    )
                    continue
                services[service_name] = cls
        self._modules = loaded
        self.services = services
