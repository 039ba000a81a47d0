"""The server's own endpoints: /esb/ping, /esb/status, /esb/invoke/{service}, /metrics."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import falcon

from esb.security import BasicAuthCheck
from esb.server.http.channels import ChannelSink, decode_json, read_body, write_response
from esb.server.http.errors import CID_HEADER, cid_of
from esb.service import HttpInfo, ServiceRuntime
from esb.service.base import Headers

PING_BODY = b'{"status": "ok"}'


class PingResource:
    """Answers while the worker's loop runs; needs no credential (load balancers probe it).

    A worker that has not built its generation answers 503 with the reason: it would
    answer every channel 503, so neither a load balancer nor `esb start` (which waits for
    this answer) may take it for serving.
    """

    def __init__(self, sink: ChannelSink):
        self.sink = sink

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        unavailable = self.sink.unavailable
        if unavailable is not None:
            resp.status = falcon.HTTP_503
            resp.data = json.dumps({"status": "not ready", "error": unavailable, "cid": cid_of(req)}).encode()
            resp.content_type = falcon.MEDIA_JSON
            resp.set_header(CID_HEADER, cid_of(req))
            return
        resp.data = PING_BODY
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header(CID_HEADER, cid_of(req))


class AdminAuth:
    def __init__(self, check: BasicAuthCheck):
        self.check = check

    def require(self, req: falcon.Request) -> None:
        if not self.check.is_allowed(req.headers):
            raise falcon.HTTPUnauthorized(description="unauthorized", challenges=[self.check.challenge])


class StatusResource:
    def __init__(self, auth: AdminAuth, collect: Callable[[], dict[str, Any]]):
        self.auth = auth
        self.collect = collect

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.auth.require(req)
        resp.data = json.dumps(self.collect()).encode()
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header(CID_HEADER, cid_of(req))


class InvokeResource:
    """Runs any deployed service with the posted JSON as its payload (admin only)."""

    def __init__(self, auth: AdminAuth, runtime: ServiceRuntime, max_body_bytes: int, body_timeout_s: float):
        self.auth = auth
        self.runtime = runtime
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    def on_post(self, req: falcon.Request, resp: falcon.Response, service: str) -> None:
        self.auth.require(req)
        cid = cid_of(req)
        payload = decode_json(read_body(req, self.max_body_bytes, self.body_timeout_s))
        http = HttpInfo(method=req.method, path=req.path, headers=Headers(req.headers), query=req.params)
        response = self.runtime.run(service, payload, cid=cid, http=http)
        write_response(resp, response, cid, is_json=True, service=service)


class MetricsResource:
    """Prometheus text format, summed over every worker of this server."""

    def __init__(self, auth: AdminAuth | None, render: Callable[[], bytes]):
        self.auth = auth
        self.render = render

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.auth is not None:
            self.auth.require(req)
        resp.data = self.render()
        resp.content_type = "text/plain; version=0.0.4"
        resp.set_header(CID_HEADER, cid_of(req))
