"""Hot deploy: validation, versions in the ODB, announcements, the pickup watcher."""

from esb.deploy.deployer import Deployer, DeployOutcome, validate_module

__all__ = ["DeployOutcome", "Deployer", "validate_module"]
