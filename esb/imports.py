"""What esb's long-lived processes do before they import their libraries: defer the body
of ``redis.asyncio``, which no esb process uses.

redis-py 8's ``redis/__init__.py`` imports ``redis.asyncio``, and that package's
``__init__`` imports the asyncio client, cluster, sentinel and connection modules: 1.2 MB
of RSS in the arbiter, in each worker and in the scheduler (memory each process keeps), for clients esb
never makes (its clients are redis-py's blocking ones, under gevent in the workers). The
package itself must exist: ``redis.commands.core`` imports
``redis.asyncio.observability.recorder``.

``defer_redis_asyncio()`` puts a finder first on ``sys.meta_path`` that answers for
``redis.asyncio`` alone, with the spec the other finders give, so ``__path__``, ``__file__``
and every submodule import as usual. Only the package's ``__init__`` waits: it runs, in
full and under a lock, the first time anything asks the module for a name it does not
hold yet and that is not a submodule (``redis.asyncio.Redis``, ``from redis.asyncio
import Redis``; ``dir()`` before that shows the submodules imported so far).
Code that uses ``redis.asyncio`` gets the real module. Nothing of redis-py is patched, and
if a release stops importing ``redis.asyncio`` eagerly the finder has nothing to defer.
Called at the top of ``esb.server.__main__`` (the arbiter, whose workers inherit it) and
``esb.scheduler.__main__``, before anything imports redis.
"""

from __future__ import annotations

import importlib
import sys
import threading
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType
from typing import Any

DEFERRED = "redis.asyncio"


class _DeferredInit:
    """The loader of DEFERRED's spec, wrapped: ``exec_module`` leaves a module-level
    ``__getattr__`` (PEP 562) that runs the real one on the first missing name."""

    def __init__(self, loader: Any):
        self._loader = loader
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        # get_source, is_package, get_resource_reader...: the real loader's.
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        state = {"done": False, "running": False}

        def __getattr__(name: str) -> Any:
            if not state["done"]:
                # A submodule is imported as itself, as when the body had imported it: the
                # body must not run while a submodule imports a sibling (client.py does
                # ``from redis.asyncio import _himport_exec``), which would be circular.
                submodule = _submodule(module, name)
                if submodule is not None:
                    return submodule
                with self._lock:  # another thread waits until the body has run
                    # Running: this thread's body asks for a name it has not defined yet,
                    # answered as a module being imported would answer.
                    if not state["done"] and not state["running"]:
                        state["running"] = True
                        try:
                            self._loader.exec_module(module)  # failing, the next use tries again
                        finally:
                            state["running"] = False
                        state["done"] = True
                        if module.__dict__.get("__getattr__") is __getattr__:
                            del module.__dict__["__getattr__"]
            try:
                return module.__dict__[name]
            except KeyError:
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}") from None

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _submodule(package: ModuleType, name: str) -> ModuleType | None:
    """PACKAGE's submodule NAME, imported, or None when NAME names no submodule."""
    if name.startswith("__"):
        return None
    fullname = f"{package.__name__}.{name}"
    if fullname not in sys.modules and PathFinder.find_spec(fullname, package.__path__) is None:
        return None
    return importlib.import_module(fullname)


class _DeferringFinder:
    """First on sys.meta_path; finds DEFERRED through the finders after it."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != DEFERRED:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _DeferredInit(spec.loader)
                return spec
        return None


def defer_redis_asyncio() -> bool:
    """Install the finder, once per process, unless redis is imported already; True when
    it is in place."""
    if any(isinstance(finder, _DeferringFinder) for finder in sys.meta_path):
        return True
    if DEFERRED in sys.modules:
        return False
    sys.meta_path.insert(0, _DeferringFinder())
    return True
