"""Configuration: server.conf and TOML object definitions, read into frozen typed objects."""

from esb.config.definitions import (
    AmqpOutconnDef,
    ApiKeyDef,
    BasicAuthDef,
    Definitions,
    HttpChannelDef,
    JobDef,
    SqlNotificationDef,
    SqlOutconnDef,
    merge_units,
    parse_unit,
)
from esb.config.secrets import masked, masked_url
from esb.config.server_conf import ServerConfig, load_server_config, render_example

__all__ = [
    "AmqpOutconnDef",
    "ApiKeyDef",
    "BasicAuthDef",
    "Definitions",
    "HttpChannelDef",
    "JobDef",
    "ServerConfig",
    "SqlNotificationDef",
    "SqlOutconnDef",
    "load_server_config",
    "masked",
    "masked_url",
    "merge_units",
    "parse_unit",
    "render_example",
]
