"""esb: an enterprise service bus and integration server.

The public API for service developers is ``Service`` (and ``BadInput`` to reject a request).

Both are imported on first use (PEP 562): ``import esb.config`` in the launcher or the CLI
must not pull the service runtime (gevent, redis, SQLAlchemy) in with the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esb.errors import BadInput
    from esb.service.base import Service

__all__ = ["BadInput", "Service"]


def __getattr__(name: str) -> Any:
    if name == "Service":
        from esb.service.base import Service

        return Service
    if name == "BadInput":
        from esb.errors import BadInput

        return BadInput
    raise AttributeError(f"module 'esb' has no attribute {name!r}")
