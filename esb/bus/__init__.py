"""Redis inside esb: client factory, key names, dispatch stream, heartbeats, deploy notices."""

from esb.bus.client import make_blocking_reader, make_redis, open_connections
from esb.bus.dispatch import DispatchMessage, enqueue, ensure_group, new_msg_id
from esb.bus.heartbeat import Heartbeat, heartbeat_client, parse_iso, utc_now_iso
from esb.bus.keys import Keys
from esb.bus.notices import DeployNotices

__all__ = [
    "DeployNotices",
    "DispatchMessage",
    "Heartbeat",
    "Keys",
    "enqueue",
    "ensure_group",
    "heartbeat_client",
    "make_blocking_reader",
    "make_redis",
    "new_msg_id",
    "open_connections",
    "parse_iso",
    "utc_now_iso",
]
