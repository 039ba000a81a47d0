"""Hot deploy: validation, versions in the ODB, announcements, the pickup watcher.

The names below are imported on first use (PEP 562): the launcher imports
``esb.deploy.pickup`` and ``esb.deploy.environment`` and must not pull in the deploy stack
(SQLAlchemy, redis-py) with the package; see ``esb.deploy.apply``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esb.deploy.deployer import Deployer, DeployOutcome, import_limit_s, validate_module
    from esb.deploy.environment import record_server_environment, server_environment
    from esb.deploy.generations import DeployFacts, WorkerGeneration, read_deploy_facts

_HOMES = {
    "DeployFacts": "esb.deploy.generations",
    "DeployOutcome": "esb.deploy.deployer",
    "Deployer": "esb.deploy.deployer",
    "WorkerGeneration": "esb.deploy.generations",
    "import_limit_s": "esb.deploy.deployer",
    "read_deploy_facts": "esb.deploy.generations",
    "record_server_environment": "esb.deploy.environment",
    "server_environment": "esb.deploy.environment",
    "validate_module": "esb.deploy.deployer",
}

__all__ = [
    "DeployFacts",
    "DeployOutcome",
    "Deployer",
    "WorkerGeneration",
    "import_limit_s",
    "read_deploy_facts",
    "record_server_environment",
    "server_environment",
    "validate_module",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'esb.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
