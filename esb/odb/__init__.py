"""The durable store of deployed modules and object definitions."""

from esb.odb.store import MODULE, UNIT, Current, OdbStore, RejectedDeployment

__all__ = ["MODULE", "UNIT", "Current", "OdbStore", "RejectedDeployment"]
