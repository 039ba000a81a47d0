"""HTTP channels over real HTTP against a running server, on SQLite and PostgreSQL ODBs:
the demo channels, hot-deployed channels with security, raw bodies and custom responses,
correlation ids, and every row of the error table."""

from __future__ import annotations

import re

import requests

from tests.helpers import Server, wait_until
from tests.integration.http_support import (
    API_KEY,
    BASIC_PASSWORD,
    BASIC_USER,
    assert_error,
    deployed_server,
)

NEW_CID = re.compile(r"^[0-9a-f]{32}$")
MAX_BODY = 1024


def test_channels_security_and_cids(esb_server, odb_url, monkeypatch):
    server = deployed_server(esb_server, odb_url, monkeypatch)
    check_demo_channels(server)
    check_json_decoding(server)
    check_request_facts_and_raw_channel(server)
    check_service_response_and_nested_invoke(server)
    check_security(server)
    check_cids(server)


def test_error_table(esb_server, odb_url, monkeypatch):
    server = deployed_server(esb_server, odb_url, monkeypatch, conf={("http", "max_body_bytes"): MAX_BODY})
    check_client_errors(server)
    check_body_limit(server)
    check_service_failures(server)


def check_demo_channels(server: Server) -> None:
    hello = server.post("/demo/hello", {"name": "esb"})
    assert hello.status_code == 200 and hello.json() == {"hello": "esb"}
    assert hello.headers["Content-Type"].startswith("application/json")
    assert server.post("/demo/hello").json() == {"hello": "world"}
    assert server.session.get(server.url("/demo/hello"), timeout=10).json() == {"hello": "world"}

    nested = {"a": 1, "b": [1, 2.5, None, True], "c": {"d": "ünï"}}
    assert server.post("/demo/echo", nested).json() == nested
    assert server.post("/demo/echo", [1, "two"]).json() == [1, "two"]
    assert server.post("/demo/echo", b"").json() == {}
    assert server.post("/demo/echo", b"  \r\n ").json() == {}
    assert server.session.get(server.url("/demo/echo"), timeout=10).json() == {}


def check_json_decoding(server: Server) -> None:
    """A JSON channel decodes the body whatever the Content-Type says."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream",
                         "application/xml", None):
        headers = {"Content-Type": content_type} if content_type else {}
        answer = server.post("/demo/echo", b'{"x": [1, 2]}', headers=headers)
        assert answer.status_code == 200 and answer.json() == {"x": [1, 2]}, (content_type, answer.text)
    inspected = server.post("/t/inspect", b'{"k": "v"}', headers={"Content-Type": "text/plain"}).json()
    assert inspected["type"] == "dict" and inspected["payload"] == {"k": "v"}
    assert server.post("/t/inspect", b"").json()["payload"] == {}


def check_request_facts_and_raw_channel(server: Server) -> None:
    url = server.url("/t/inspect?x=1&y=two")
    seen = server.session.get(url, headers={"X-Probe": "p-1"}, timeout=10).json()
    assert seen["method"] == "GET" and seen["path"] == "/t/inspect"
    assert seen["query"] == {"x": "1", "y": "two"}
    assert seen["probe"] == "p-1"
    assert seen["job"] is None
    put = server.session.put(server.url("/t/inspect"), data=b"[3]", timeout=10).json()
    assert put["method"] == "PUT" and put["payload"] == [3]

    # A raw channel hands the service bytes, even ones that are not JSON, and sends bytes back.
    raw = server.post("/t/raw", b"\x00\x01{not json\xff", headers={"Content-Type": "application/json"})
    assert raw.status_code == 200, raw.text
    assert raw.content == bytes(reversed(b"\x00\x01{not json\xff"))
    assert raw.headers["Content-Type"] == "application/octet-stream"
    assert server.post("/t/raw", b"").content == b""


def check_service_response_and_nested_invoke(server: Server) -> None:
    created = server.post("/t/created", {})
    assert created.status_code == 201 and created.json() == {"created": 7}
    assert created.headers["X-Test-Header"] == "set-by-service"
    assert created.headers["Location"] == "/t/orders/7"
    assert NEW_CID.match(created.headers["X-ESB-CID"])

    # self.invoke runs the other service in the same request, under the same cid.
    outer = server.post("/t/outer", {"n": 41}, headers={"X-ESB-CID": "nested-1"})
    assert outer.status_code == 200, outer.text
    assert outer.json() == {"outer_cid": "nested-1", "inner": {"n": 42, "cid": "nested-1"}}
    assert outer.headers["X-ESB-CID"] == "nested-1"


def check_security(server: Server) -> None:
    good = server.post("/t/basic", {"who": "alice"}, auth=(BASIC_USER, BASIC_PASSWORD))
    assert good.status_code == 200 and good.json()["payload"] == {"who": "alice"}, good.text

    missing = server.post("/t/basic", {})
    assert_error(missing, 401)
    assert missing.headers["WWW-Authenticate"].startswith("Basic")
    refusals = [missing]
    for credential in [(BASIC_USER, "wrong"), ("bob", BASIC_PASSWORD), (BASIC_USER, ""),
                       (BASIC_USER, BASIC_PASSWORD + "x")]:
        refusals.append(server.post("/t/basic", {}, auth=credential))
    refusals.append(server.post("/t/basic", {}, headers={"Authorization": "Bearer " + BASIC_PASSWORD}))
    refusals.append(server.post("/t/basic", {}, headers={"X-API-Key": API_KEY}))

    assert server.post("/t/key", {"k": 1}, headers={"X-API-Key": API_KEY}).json()["payload"] == {"k": 1}
    assert server.post("/t/key", {}, headers={"x-api-key": API_KEY}).status_code == 200
    refusals.append(server.post("/t/key", {}))
    for key in ["wrong", API_KEY + "0", API_KEY[:-1], ""]:
        refusals.append(server.post("/t/key", {}, headers={"X-API-Key": key}))
    refusals.append(server.post("/t/key", {}, auth=(BASIC_USER, BASIC_PASSWORD)))
    # Credentials are checked before the body is looked at: bad JSON without them is still 401.
    refusals.append(server.post("/t/key", b"{oops"))

    # Nothing about why: every refusal says the same.
    messages = {assert_error(response, 401) for response in refusals}
    assert len(messages) == 1, messages
    message = messages.pop().lower()
    assert not any(word in message for word in ("password", "user", "key", "header", "missing", "wrong"))
    assert "WWW-Authenticate" not in refusals[-1].headers


def check_cids(server: Server) -> None:
    kept = ["order-42.A_b", "x", "a" * 64, "0123456789abcdef"]
    for cid in kept:
        answer = server.post("/t/inspect", {}, headers={"X-ESB-CID": cid})
        assert answer.headers["X-ESB-CID"] == cid
        assert answer.json()["cid"] == cid
    replaced = ["a" * 65, "has space", "a<b>", "semi;colon", "quote\"d", "slash/ed", "é-accent".encode(),
                "tab\there", ""]
    for cid in replaced:
        answer = server.post("/t/inspect", {}, headers={"X-ESB-CID": cid})
        assert answer.status_code == 200, (cid, answer.text)
        made = answer.headers["X-ESB-CID"]
        assert NEW_CID.match(made), (cid, made)
        assert answer.json()["cid"] == made
    # Every answer carries one, the server's own endpoints and errors included.
    for response in [
        server.session.get(server.url("/esb/ping"), timeout=10),
        server.session.get(server.url("/esb/status"), timeout=10),
        server.session.get(server.url("/metrics"), timeout=10),
        server.post("/no/such/channel", {}),
        server.post("/t/missing", {}),
        server.post("/t/fail", {}),
        server.post("/t/basic", {}),
    ]:
        assert NEW_CID.match(response.headers.get("X-ESB-CID", "")), (response.url, response.headers)
    echoed = server.post("/no/such/channel", {}, headers={"X-ESB-CID": "lost-1"})
    assert assert_error(echoed, 404) and echoed.json()["cid"] == "lost-1"
    ping = server.session.get(server.url("/esb/ping"), headers={"X-ESB-CID": "lb-probe"}, timeout=10)
    assert ping.headers["X-ESB-CID"] == "lb-probe"


def check_client_errors(server: Server) -> None:
    for body in [b"{", b'{"a": 1', b"not json", b"{'single': 1}", b"[1, 2,]", b"\xff\xfe"]:
        assert_error(server.post("/demo/echo", body), 400)
    malformed = server.post("/demo/echo", b'{"a": ', headers={"X-ESB-CID": "bad-json-1"})
    assert "JSON" in assert_error(malformed, 400) and malformed.json()["cid"] == "bad-json-1"

    for path in ["/nope", "/demo/hello/", "/demo", "/DEMO/HELLO", "/t/inspect/extra", "/"]:
        assert_error(server.post(path, {}), 404)
    assert_error(server.session.get(server.url("/nope?x=1"), timeout=10), 404)

    not_allowed = server.post("/t/get-only", {})
    assert_error(not_allowed, 405)
    assert not_allowed.headers["Allow"] == "GET"
    assert server.session.get(server.url("/t/get-only"), timeout=10).status_code == 200

    assert "not deployed" in assert_error(server.post("/t/missing", {}), 503)

    # The server's own endpoints answer odd requests with the same error body.
    assert_error(server.session.delete(server.url("/esb/ping"), timeout=10), 405)
    assert_error(server.session.patch(server.url("/esb/status"), timeout=10), 405)
    assert_error(server.session.get(server.url("/esb/invoke/demo.echo"), timeout=10), 405)

    rejected = server.post("/t/reject", {})
    assert assert_error(rejected, 400) == "field 'order' is required"


def chunks(total: int, size: int = 100):
    """A body sent with Transfer-Encoding: chunked (requests does so for a generator)."""
    sent = 0
    while sent < total:
        part = min(size, total - sent)
        yield b" " * part
        sent += part


def post_chunked(server: Server, path: str, parts) -> requests.Response:
    return server.session.post(server.url(path), data=parts, timeout=30)


def check_body_limit(server: Server) -> None:
    at_limit = b'{"pad": "' + b"x" * (MAX_BODY - 12) + b'"}'
    assert len(at_limit) == MAX_BODY - 1
    assert server.post("/demo/echo", at_limit).status_code == 200
    assert server.post("/demo/echo", at_limit + b" ").status_code == 200

    over = at_limit + b"  "
    assert len(over) == MAX_BODY + 1
    assert "limit" in assert_error(server.post("/demo/echo", over), 413)
    assert_error(server.post("/demo/echo", b"[" + b"1," * 5000 + b"1]"), 413)
    assert_error(server.post("/t/raw", b"\x00" * (MAX_BODY + 1)), 413)
    assert_error(server.post("/esb/invoke/demo.echo", over, headers=server.admin_headers()), 413)

    # Chunked bodies carry no Content-Length: the limit holds while reading them, and a
    # chunked body within it arrives whole.
    assert_error(post_chunked(server, "/demo/echo", chunks(MAX_BODY + 1)), 413)
    assert_error(post_chunked(server, "/t/raw", chunks(50 * MAX_BODY, size=1000)), 413)
    small = post_chunked(server, "/demo/echo", iter([b'{"chunked": ', b"true}"]))
    assert small.status_code == 200 and small.json() == {"chunked": True}, small.text
    raw = post_chunked(server, "/t/raw", iter([b"abc", b"def"]))
    assert raw.content == b"fedcba"
    # The connection stays usable after a refusal.
    assert server.post("/demo/hello", {}).json() == {"hello": "world"}


def check_service_failures(server: Server) -> None:
    failed = server.post("/t/fail", {"x": 1}, headers={"X-ESB-CID": "boom-cid-1"})
    message = assert_error(failed, 500)
    assert failed.json()["cid"] == "boom-cid-1"
    for leak in ("Traceback", "RuntimeError", "exploded", "httptest", "File "):
        assert leak not in failed.text, failed.text
    assert "boom-cid-1" in message or "cid" in message

    def traceback_logged() -> bool:
        log = server.log()
        at = log.find("cid=boom-cid-1")
        return at >= 0 and "Traceback" in log[at:] and "RuntimeError: t.fail exploded on purpose" in log[at:]

    wait_until(traceback_logged, message="the traceback in server.log after the cid")
    assert failed.json()["cid"] != server.post("/t/fail", {}).json()["cid"]
    # The worker that failed keeps serving.
    assert server.post("/demo/echo", {"after": 1}).json() == {"after": 1}

