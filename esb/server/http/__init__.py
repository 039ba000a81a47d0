"""The HTTP side of a worker: channels, admin endpoints, error mapping."""

from esb.server.http.app import make_app
from esb.server.http.channels import ChannelSink, CompiledChannel, compile_channels

__all__ = ["ChannelSink", "CompiledChannel", "compile_channels", "make_app"]
