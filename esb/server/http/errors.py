"""HTTP error mapping, in one place: esb errors to statuses, every error body to JSON.

Every error answer is ``{"error": ..., "cid": ...}`` with the X-ESB-CID header; a
traceback goes to the log with the cid and never to the client.
"""

from __future__ import annotations

import json
import logging

import falcon

from esb.errors import BadInput, EsbError, ServiceFailed, ServiceNotFound, Unavailable
from esb.observe import metrics
from esb.observe.context import cid_or_new
from esb.observe.logs import bounded_traceback

logger = logging.getLogger(__name__)

CID_HEADER = "X-ESB-CID"
INTERNAL_ERROR = "internal error; see the server log for this cid"


def cid_of(req: falcon.Request) -> str:
    """The request's correlation id: its X-ESB-CID if a plain token (``cid_or_new``), else new."""
    cid = getattr(req.context, "cid", None)
    if cid is None:
        cid = req.context.cid = cid_or_new(req.get_header(CID_HEADER))
    return cid


def write_error(
    req: falcon.Request, resp: falcon.Response, status: int, message: str, *, is_logged: bool = False
) -> None:
    """Answer STATUS with the JSON error body; log it in one line unless IS_LOGGED already."""
    cid = cid_of(req)
    if not is_logged:
        logger.log(
            logging.WARNING if status >= 500 else logging.INFO,
            "%s %s answered %d: %s",
            req.method,
            req.path,
            status,
            message[:300],
            extra={"cid": cid},
        )
    metrics.http_errors[status] += 1
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps({"error": message, "cid": cid})
    resp.set_header(CID_HEADER, cid)


def _serialize_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    for name, value in (exc.headers or {}).items():
        resp.set_header(name, value)
    write_error(req, resp, exc.status_code, exc.description or exc.title)


# The status each esb error answers with; the most specific class in the MRO wins.
STATUS_OF: dict[type[EsbError], int] = {
    ServiceNotFound: 404,
    Unavailable: 503,
}


def _handle_esb_error(req: falcon.Request, resp: falcon.Response, exc: EsbError, params: dict) -> None:
    if isinstance(exc, ServiceFailed):
        # Logged where it happened, with the service's name; the client learns only the cid.
        write_error(req, resp, 500, INTERNAL_ERROR, is_logged=True)
        return
    if isinstance(exc, BadInput):
        write_error(req, resp, exc.status_code, exc.message)
        return
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            write_error(req, resp, STATUS_OF[cls], str(exc))
            return
    _handle_unexpected(req, resp, exc, params)


def _handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict) -> None:
    if isinstance(exc, falcon.HTTPError):
        _serialize_http_error(req, resp, exc)
        return
    logger.error(
        "%s %s failed with an unexpected %s; answering 500\n%s",
        req.method,
        req.path,
        type(exc).__name__,
        bounded_traceback(exc),
        extra={"cid": cid_of(req)},
    )
    write_error(req, resp, 500, INTERNAL_ERROR, is_logged=True)


def install(app: falcon.App) -> None:
    """Replace falcon's defaults: JSON error bodies, no traceback to the client."""
    app.set_error_serializer(_serialize_http_error)
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(EsbError, _handle_esb_error)
