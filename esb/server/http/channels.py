"""HTTP channels: one falcon sink that looks the path up in a table swapped whole on deploy.

falcon cannot remove routes, so hot-deployed channels live in our own dict; the sink is
the only per-request code between falcon and the service.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import falcon

from esb.config import Definitions, HttpChannelDef
from esb.errors import BadInput, ServiceNotFound
from esb.observe import metrics
from esb.security import ApiKeyCheck, BasicAuthCheck, CredentialCheck
from esb.server.http.errors import CID_HEADER, cid_of
from esb.service import HttpInfo, Response, ServiceRuntime
from esb.service.base import Headers


@dataclass(frozen=True)
class CompiledChannel:
    """A channel with everything parsed at deploy time, nothing left for the request path."""

    definition: HttpChannelDef
    methods: frozenset[str]
    check: CredentialCheck | None
    is_json: bool


def compile_channels(definitions: Definitions) -> dict[str, CompiledChannel]:
    checks: dict[str, CredentialCheck] = {}
    for name, basic in definitions.of("security.basic_auth").items():
        checks[name] = BasicAuthCheck.from_def(basic)
    for name, key in definitions.of("security.api_key").items():
        checks[name] = ApiKeyCheck.from_def(key)
    return {
        channel.path: CompiledChannel(
            definition=channel,
            methods=frozenset(channel.methods),
            check=checks[channel.security] if channel.security else None,
            is_json=channel.data_format == "json",
        )
        for channel in definitions.channels.values()
    }


def read_body(req: falcon.Request, max_bytes: int) -> bytes:
    """The request body, refusing more than MAX_BYTES with 413 before reading it if possible."""
    length = req.content_length
    if length is not None and length > max_bytes:
        raise falcon.HTTPContentTooLarge(
            description=f"request body of {length} bytes is over the limit of {max_bytes}"
        )
    # A chunked body has no Content-Length, and falcon's bounded_stream then reads nothing;
    # an input the server ends where the body ends (gunicorn's does) is read to its end.
    if length is None and req.env.get("wsgi.input_terminated"):
        stream = req.stream
    else:
        stream = req.bounded_stream
    body = stream.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"request body is over the limit of {max_bytes}")
    return body


def decode_json(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadInput(f"malformed JSON: {exc}") from None


def write_response(resp: falcon.Response, response: Response, cid: str, *, is_json: bool) -> None:
    resp.status = response.status_code
    payload = response.payload
    if isinstance(payload, bytes | bytearray):
        resp.data = bytes(payload)
        resp.content_type = falcon.MEDIA_JSON if is_json else "application/octet-stream"
    elif isinstance(payload, str) and not is_json:
        resp.text = payload
        resp.content_type = falcon.MEDIA_TEXT
    elif payload is not None:
        resp.data = json.dumps(payload).encode()
        resp.content_type = falcon.MEDIA_JSON
    if response.headers:
        resp.set_headers(response.headers)
    resp.set_header(CID_HEADER, cid)


class ChannelSink:
    """Serves every path that is not the server's own: looks up the channel and runs it."""

    def __init__(self, runtime: ServiceRuntime, max_body_bytes: int):
        self.runtime = runtime
        self.max_body_bytes = max_body_bytes
        self.table: dict[str, CompiledChannel] = {}

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_params: Any) -> None:
        channel = self.table.get(req.path)
        if channel is None:
            raise falcon.HTTPNotFound(description=f"no channel at {req.path}")
        cid = cid_of(req)
        req.env[metrics.CHANNEL_KEY] = channel.definition.name  # counted by metrics.counting
        if req.method not in channel.methods:
            raise falcon.HTTPMethodNotAllowed(
                sorted(channel.methods), description=f"{req.method} is not allowed here"
            )
        headers = req.headers
        if channel.check is not None and not channel.check.is_allowed(headers):
            challenge = channel.check.challenge
            raise falcon.HTTPUnauthorized(
                description="unauthorized", challenges=[challenge] if challenge else None
            )
        service = channel.definition.service
        if service not in self.runtime.store.services:
            raise falcon.HTTPServiceUnavailable(description=f"service {service} is not deployed")
        body = read_body(req, self.max_body_bytes)
        payload = decode_json(body) if channel.is_json else body
        http = HttpInfo(method=req.method, path=req.path, headers=Headers(headers), query=req.params)
        try:
            response = self.runtime.invoke(service, payload, cid=cid, http=http)
        except ServiceNotFound as exc:
            # Undeployed between the check above and the call: the same answer as above.
            raise falcon.HTTPServiceUnavailable(description=str(exc)) from None
        write_response(resp, response, cid, is_json=channel.is_json)
