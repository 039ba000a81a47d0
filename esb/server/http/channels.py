"""HTTP channels: one falcon sink that looks the path up in a table swapped whole on deploy.

falcon cannot remove routes, so hot-deployed channels live in our own dict; the sink is
the only per-request code between falcon and the service.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import falcon
from gevent.timeout import Timeout
from gunicorn.http.errors import ParseException

from esb.config import Definitions, HttpChannelDef
from esb.errors import BadInput, ServiceFailed, ServiceNotFound
from esb.observe import metrics
from esb.security import ApiKeyCheck, BasicAuthCheck, CredentialCheck
from esb.server.http.errors import CID_HEADER, cid_of
from esb.service import HttpInfo, Response, ServiceRuntime
from esb.service.base import Headers

logger = logging.getLogger(__name__)


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


# JSON nested deeper than this is refused with 400, long before the decoder's own limit.
MAX_JSON_DEPTH = 512
_DECODER = json.JSONDecoder()
_ENCODER = json.JSONEncoder(allow_nan=False)  # strict JSON: NaN and Infinity are refused
# RFC 9110 tokens for header names; header values as gunicorn sends them: no CR, LF, NUL
# or other control characters, nothing beyond Latin-1.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")


def read_body(req: falcon.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, whole: 413 over MAX_BYTES (before reading it when the length is
    known), 408 when it has not arrived within TIMEOUT_S, 400 when it ends early or its
    chunked framing is broken. After a 408 or 400 the connection is not reused.
    """
    length = req.content_length
    if length is not None and length > max_bytes:
        raise falcon.HTTPContentTooLarge(
            description=f"request body of {length} bytes is over the limit of {max_bytes}"
        )
    if length == 0:
        return b""
    env = req.env
    # A chunked body has no Content-Length, and falcon's bounded_stream then reads nothing;
    # an input the server ends where the body ends (gunicorn's does) is read to its end.
    if length is None and env.get("wsgi.input_terminated"):
        stream = req.stream
    else:
        stream = req.bounded_stream
    raw = env.get("wsgi.input")
    timer = None
    # PERF(esb): a timer costs about 1.5 us; a body already in the server's buffer (most
    # small requests arrive with their headers) cannot stall, so it is read without one.
    if not _is_buffered(raw, length):
        timer = Timeout(timeout_s)
        timer.start()
    try:
        body = stream.read(max_bytes + 1)
    except Timeout as exc:
        if exc is not timer:
            raise
        _close_connection(env)
        raise falcon.HTTPError(
            falcon.HTTP_408, description=f"request body did not arrive within {timeout_s:g} s"
        ) from None
    except (OSError, ValueError, ParseException) as exc:
        # A chunked body cut short or malformed (gunicorn raises NoMoreData, an OSError,
        # or a ParseException), or the client gone.
        _close_connection(env)
        message = f"request body is incomplete or malformed: {exc}"[:300]
        raise falcon.HTTPBadRequest(description=message) from None
    finally:
        if timer is not None:
            timer.close()
    if len(body) > max_bytes:
        raise falcon.HTTPContentTooLarge(description=f"request body is over the limit of {max_bytes}")
    if length is not None and len(body) < length:
        # The client half-closed before sending what it announced.
        _close_connection(env)
        raise falcon.HTTPBadRequest(
            description=f"request body ended after {len(body)} of its {length} bytes (Content-Length)"
        )
    return body


def _is_buffered(stream: Any, length: int | None) -> bool:
    """True when the whole body of LENGTH bytes is already in memory: an in-memory stream,
    or gunicorn's body whose read-ahead buffer (``Body.reader.unreader.buf``) holds it."""
    if length is None:
        return False
    if isinstance(stream, io.BytesIO):
        return True
    buf = getattr(getattr(getattr(stream, "reader", None), "unreader", None), "buf", None)
    if not isinstance(buf, io.BytesIO):
        return False
    return buf.getbuffer().nbytes >= length


def _close_connection(env: dict) -> None:
    """After this answer, close the connection: what is left of the body is unknown.

    gunicorn's ``Body.failed`` (set by gunicorn itself when a body read raises) makes its
    parser stop instead of looking for the next request on the connection.
    """
    stream = env.get("wsgi.input")
    if hasattr(stream, "failed"):
        stream.failed = True


def decode_json(body: bytes) -> Any:
    """BODY decoded, ``{}`` when blank; BadInput when it is not JSON or nests too deep."""
    if not body.strip():
        return {}
    try:
        # PERF(esb): UTF-8 (RFC 8259) decoded first, then the str decoder: 0.94 us for the
        # bench's body against 1.62 us for json.loads(bytes), which sniffs for UTF-16 and
        # UTF-32 first. A UTF-8 byte order mark is allowed, as json.loads(bytes) allowed it.
        text = body.decode()
        value = _DECODER.decode(text[1:] if text.startswith("\ufeff") else text)
    except RecursionError:
        raise BadInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise BadInput(f"malformed JSON: {exc}") from None
    # PERF(esb): only a body holding more brackets than the limit can nest beyond it, and
    # counting them is a memchr-speed scan, skipped for bodies under 1 KiB.
    if (
        len(body) > 2 * MAX_JSON_DEPTH
        and body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
        and _nests_deeper(value, MAX_JSON_DEPTH)
    ):
        raise BadInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _nests_deeper(value: Any, limit: int) -> bool:
    """True when VALUE holds lists or dicts nested more than LIMIT levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def write_response(
    resp: falcon.Response, response: Response, cid: str, *, is_json: bool, service: str
) -> None:
    """Turn SERVICE's response into the HTTP answer.

    Raises ServiceFailed (logged once here) when the service answered something HTTP
    cannot carry: a status that is not an int from 200 to 599, a header that is not a
    token with a Latin-1 value free of CR and LF, a payload that is not strict JSON.
    """
    status = response.status_code
    # PERF(esb): the exact-int test first; int subclasses (HTTPStatus) take the long way.
    if not (type(status) is int and 200 <= status <= 599) and not (
        isinstance(status, int) and not isinstance(status, bool) and 200 <= status <= 599
    ):
        raise _unusable(service, cid, f"status code {status!r:.40}, which is not an int from 200 to 599")
    resp.status = int(status)
    payload = response.payload
    if isinstance(payload, bytes | bytearray):
        resp.data = bytes(payload)
        resp.content_type = falcon.MEDIA_JSON if is_json else "application/octet-stream"
    elif isinstance(payload, str) and not is_json:
        resp.text = payload
        resp.content_type = falcon.MEDIA_TEXT
    elif payload is not None:
        try:
            resp.data = _ENCODER.encode(payload).encode()
        except (ValueError, TypeError, RecursionError) as exc:
            raise _unusable(service, cid, f"a payload that is not JSON ({exc})") from None
        resp.content_type = falcon.MEDIA_JSON
    headers = response.headers
    if headers:
        try:
            items = list(headers.items())
        except AttributeError:
            raise _unusable(service, cid, f"headers of type {type(headers).__name__}, not a dict") from None
        for name, value in items:
            if not (isinstance(name, str) and _TOKEN.fullmatch(name)):
                raise _unusable(service, cid, f"a header name {name!r:.60} that is not an HTTP token")
            if not (isinstance(value, str) and _HEADER_VALUE.fullmatch(value)):
                what = f"header {name} with a value that is not Latin-1 text free of CR, LF and controls"
                raise _unusable(service, cid, what)
        resp.set_headers(items)
    resp.set_header(CID_HEADER, cid)


def _unusable(service: str, cid: str, what: str) -> ServiceFailed:
    logger.error(
        "service %s answered %s; answering 500", service, what, extra={"cid": cid, "service": service}
    )
    return ServiceFailed(service, cid, f"unusable answer: {what}")


class RequestHeaders(Mapping[str, str]):
    """The request's headers by upper-case name, as falcon's ``req.headers``, built only
    when something iterates them or reads one by ``[]``.

    PERF(esb): falcon builds that dict from the whole WSGI environ (about 1 us here); most
    requests never look at it. ``get``, which the credential checks use, reads one header.
    """

    __slots__ = ("_req",)

    def __init__(self, req: falcon.Request):
        self._req = req

    def get(self, name: str, default: Any = None) -> Any:
        return self._req.get_header(name, default=default)

    def __getitem__(self, name: str) -> str:
        return self._req.headers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._req.headers

    def __iter__(self) -> Iterator[str]:
        return iter(self._req.headers)

    def __len__(self) -> int:
        return len(self._req.headers)


class ChannelSink:
    """Serves every path that is not the server's own: looks up the channel and runs it."""

    def __init__(self, runtime: ServiceRuntime, max_body_bytes: int, body_timeout_s: float):
        self.runtime = runtime
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.table: dict[str, CompiledChannel] = {}
        # Why this worker serves no channel yet (it has not built a generation), or None:
        # then every path answers 503, since any of them may be a deployed channel.
        self.unavailable: str | None = "this worker has not built its generation yet"

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_params: Any) -> None:
        channel = self.table.get(req.path)
        if channel is None:
            if self.unavailable is not None:
                raise falcon.HTTPServiceUnavailable(description=self.unavailable)
            raise falcon.HTTPNotFound(description=f"no channel at {req.path}")
        cid = cid_of(req)
        req.env[metrics.CHANNEL_KEY] = channel.definition.name  # counted by metrics.counting
        if req.method not in channel.methods:
            raise falcon.HTTPMethodNotAllowed(
                sorted(channel.methods), description=f"{req.method} is not allowed here"
            )
        headers = RequestHeaders(req)
        if channel.check is not None and not channel.check.is_allowed(headers):
            challenge = channel.check.challenge
            raise falcon.HTTPUnauthorized(
                description="unauthorized", challenges=[challenge] if challenge else None
            )
        service = channel.definition.service
        if service not in self.runtime.store.services:
            raise falcon.HTTPServiceUnavailable(description=f"service {service} is not deployed")
        body = read_body(req, self.max_body_bytes, self.body_timeout_s)
        payload = decode_json(body) if channel.is_json else body
        http = HttpInfo(method=req.method, path=req.path, headers=Headers(headers), query=req.params)
        try:
            response = self.runtime.run(service, payload, cid=cid, http=http)
        except ServiceNotFound as exc:
            # Undeployed between the check above and the call: the same answer as above.
            # (An unknown service invoked by this one is its failure: ServiceFailed, 500.)
            raise falcon.HTTPServiceUnavailable(description=str(exc)) from None
        write_response(resp, response, cid, is_json=channel.is_json, service=service)
