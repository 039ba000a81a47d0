"""The falcon app of a worker: the server's own routes, the channel sink, error mapping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from esb.config import ServerConfig
from esb.security import BasicAuthCheck
from esb.server.http import errors
from esb.server.http.admin import (
    AdminAuth,
    InvokeResource,
    MetricsResource,
    PingResource,
    StatusResource,
)
from esb.server.http.channels import ChannelSink
from esb.service import ServiceRuntime


def make_app(
    config: ServerConfig,
    runtime: ServiceRuntime,
    *,
    collect_status: Callable[[], dict[str, Any]],
    render_metrics: Callable[[], bytes],
) -> tuple[falcon.App, ChannelSink]:
    """Build the app and return it with its channel sink, whose table the worker swaps."""
    app = falcon.App()
    # PERF(esb): a JSON channel decodes the body whatever its Content-Type; skip form parsing.
    app.req_options.auto_parse_form_urlencoded = False
    app.req_options.strip_url_path_trailing_slash = False
    errors.install(app)

    auth = AdminAuth(BasicAuthCheck(config.admin.username, config.admin.password))
    max_body = config.http.max_body_bytes
    body_timeout_s = config.http.body_timeout_s
    app.add_route("/esb/status", StatusResource(auth, collect_status))
    app.add_route("/esb/invoke/{service}", InvokeResource(auth, runtime, max_body, body_timeout_s))
    metrics_auth = auth if config.http.metrics_auth == "admin" else None
    app.add_route("/metrics", MetricsResource(metrics_auth, render_metrics))

    sink = ChannelSink(runtime, max_body, body_timeout_s)
    app.add_route("/esb/ping", PingResource(sink))
    app.add_sink(sink, prefix="/")
    return app, sink
