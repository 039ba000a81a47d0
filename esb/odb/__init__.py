"""The durable store of deployed modules and object definitions."""

from esb.odb.store import MODULE, UNIT, Current, OdbStore

__all__ = ["MODULE", "UNIT", "Current", "OdbStore"]
