"""Hot deploy: validation, versions in the ODB, announcements, the pickup watcher."""

from esb.deploy.deployer import Deployer, DeployOutcome, import_limit_s, validate_module
from esb.deploy.environment import record_server_environment, server_environment

__all__ = [
    "DeployOutcome",
    "Deployer",
    "import_limit_s",
    "record_server_environment",
    "server_environment",
    "validate_module",
]
