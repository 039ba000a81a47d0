"""Hot deploy: validation, versions in the ODB, announcements, the pickup watcher."""

from esb.deploy.deployer import Deployer, DeployOutcome, import_limit_s, validate_module
from esb.deploy.environment import record_server_environment, server_environment
from esb.deploy.generations import DeployFacts, WorkerGeneration, read_deploy_facts

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
