"""esb: an enterprise service bus and integration server.

The public API for service developers is ``Service`` (and ``BadInput`` to reject a request).
"""

from esb.errors import BadInput
from esb.service.base import Service

__all__ = ["BadInput", "Service"]
