"""User code and bad input never take the server down (issue 8, HTTP half), over real HTTP
against a running server: whatever a service raises or answers, whatever a client sends
(the corpus in bad_requests/), the answer is esb's JSON error body with a cid, the log
has one line for it, and the workers keep serving."""

from __future__ import annotations

import json
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import Server, esb, wait_until
from tests.integration.http_support import assert_error, deployed_server

BAD_REQUESTS = Path(__file__).parent / "bad_requests"
BODY_TIMEOUT_S = 3
STALLED = 3000
_REPEAT = re.compile(r"\{\{(\d+)\*(.*?)\}\}")


# -- helpers -------------------------------------------------------------------------


def raw_exchange(server: Server, data: bytes, *, half_close: bool = True, timeout_s: float = 30) -> bytes:
    """Send DATA on a new connection, half-close, return everything until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), raw[:300]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def assert_raw_error(raw: bytes, status: int) -> str:
    """A raw answer: STATUS, JSON body of exactly error and cid, the cid in the header."""
    got, headers, body = parse_answer(raw)
    assert got == status, raw[:500]
    assert headers["content-type"].startswith("application/json"), headers
    if "transfer-encoding" in headers:  # gunicorn chunks an answer of unknown length
        body = dechunk(body)
    decoded = json.loads(body)
    assert set(decoded) == {"error", "cid"} and decoded["error"], decoded
    assert decoded["cid"] == headers["x-esb-cid"], (decoded, headers)
    for leak in ("Traceback", "<html", "File \""):
        assert leak not in raw.decode("latin-1"), raw[:500]
    return decoded["cid"]


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


def log_lines_with(server: Server, cid: str) -> int:
    return sum(cid in line for line in server.log().splitlines())


def assert_logged_once(server: Server, cid: str) -> None:
    """The server log holds exactly one line naming CID (a traceback's lines do not)."""
    wait_until(lambda: log_lines_with(server, cid) >= 1, message=f"a log line for cid {cid}")
    assert log_lines_with(server, cid) == 1, [line for line in server.log().splitlines() if cid in line]


def load_request(path: Path) -> tuple[int, bytes]:
    """A corpus file: (expected status, raw request bytes); see bad_requests/README.md."""
    text = path.read_text()
    expect = int(re.search(r"^# expect: (\d+)$", text, re.M).group(1))
    lines = [line for line in text.split("\n") if not line.startswith("#")]
    text = _REPEAT.sub(lambda m: int(m.group(1)) * m.group(2).replace("\\n", "\n"), "\n".join(lines))
    head, blank, body = text.partition("\n\n")
    head_lines = head.rstrip("\n").split("\n")
    raw = "\r\n".join(head_lines) + "\r\n\r\n"
    if blank:
        raw += body.removesuffix("\n").replace("\\r\\n", "\r\n")
    return expect, raw.encode()


# -- the service boundary and what a service answers ---------------------------------------


SERVICE_FAULTS = [
    ("/t/raise", {"raise": "SystemExit", "code": 0}),
    ("/t/raise", {"raise": "SystemExit", "code": 1}),
    ("/t/raise", {"raise": "SystemExit", "code": 3}),
    ("/t/raise", {"raise": "KeyboardInterrupt"}),
    ("/t/raise", {"raise": "GeneratorExit"}),
    ("/t/raise", {"raise": "Timeout"}),
    ("/t/raise", {"raise": "BadInput", "status": 999}),
    ("/t/raise", {"raise": "BadInput", "status": 200}),
    ("/t/raise", {"raise": "BadInput", "status": 500}),
    ("/t/raise", {"raise": "BadInput", "status": "400"}),
    *[("/t/answer", {"status": code}) for code in (0, -1, 1.5, "abc", "200", 100, 101, 199, 600, 999, True)],
    ("/t/answer", {"headers": {"X-Injected": "a\r\nSet-Cookie: stolen=1"}}),
    ("/t/answer", {"headers": {"X-Injected": "a\nb"}}),
    ("/t/answer", {"headers": {"X-Injected": "a\rb"}}),
    ("/t/answer", {"headers": {"X-Injected": "nul\x00"}}),
    ("/t/answer", {"headers": {"X-Euro": "\u20ac"}}),
    ("/t/answer", {"headers": {"Bad Name": "v"}}),
    ("/t/answer", {"headers": {"X-Split\r\nX-Other": "v"}}),
    ("/t/answer", {"payload": "nan"}),
    ("/t/answer", {"payload": "inf"}),
    ("/t/answer", {"payload": "-inf"}),
    ("/t/invoke-nowhere", {}),
]


def check_service_faults(server: Server) -> None:
    for number, (path, payload) in enumerate(SERVICE_FAULTS):
        cid = f"fault-{number}"
        answer = server.post(path, payload, headers={"X-ESB-CID": cid})
        message = assert_error(answer, 500)
        assert answer.json()["cid"] == cid
        assert message == "internal error; see the server log for this cid", (payload, message)
        for leak in ("stolen", "Traceback", "SystemExit", "t.raise", "t.answer", "deployed-nowhere"):
            assert leak not in answer.text, (payload, answer.text)
        assert "Set-Cookie" not in answer.headers and "X-Injected" not in answer.headers
        assert_logged_once(server, cid)
    log = server.log()
    assert "service t.raise failed with SystemExit" in log
    assert "service t.answer answered status code 101" in log
    assert "ServiceNotFound: service 't.deployed-nowhere' is not deployed" in log


def check_service_answers_that_stay_valid(server: Server) -> None:
    """What is not a fault keeps working: 4xx from BadInput, HTTPStatus, Latin-1 headers."""
    for status in (400, 404, 422, 499):
        answer = server.post("/t/raise", {"raise": "BadInput", "status": status})
        assert assert_error(answer, status) == "rejected on purpose"
    for status in (200, 201, 204, 302, 418, 503, 599):
        answer = server.post("/t/answer", {"status": status, "headers": {"X-Latin": "caf\u00e9"}})
        assert answer.status_code == status, answer.text
        assert answer.headers["X-Latin"].encode("latin-1") == "caf\u00e9".encode("latin-1")


def check_recursive_invoke(server: Server) -> None:
    before = len(server.log().splitlines())
    answer = server.post("/t/recurse", {}, headers={"X-ESB-CID": "recurse-1"})
    assert assert_error(answer, 500) and answer.json()["cid"] == "recurse-1"
    assert_logged_once(server, "recurse-1")
    log = server.log()
    added = len(log.splitlines()) - before
    assert added < 80, f"a recursive invoke logged {added} lines"
    assert "InvokeDepthError" in log and "nested deeper than" in log


def check_deep_json(server: Server) -> None:
    for depth, status in ((500, 200), (513, 400), (5000, 400)):
        body = b"[" * depth + b"]" * depth
        cid = f"deep-{depth}"
        answer = server.post("/demo/echo", body, headers={"X-ESB-CID": cid})
        if status == 200:
            assert answer.status_code == 200, answer.text
            continue
        assert "nested deeper than 512" in assert_error(answer, 400)
        assert_logged_once(server, cid)
    nested_object = b'{"a":' * 5000 + b"1" + b"}" * 5000
    assert_error(server.post("/demo/echo", nested_object), 400)
    assert "RecursionError" not in server.log()


def check_bad_requests(server: Server) -> None:
    cases = sorted(BAD_REQUESTS.glob("*.http"))
    assert len(cases) >= 15
    for path in cases:
        expect, data = load_request(path)
        raw = raw_exchange(server, data)
        try:
            cid = assert_raw_error(raw, expect)
        except AssertionError as exc:
            raise AssertionError(f"{path.name}: {exc}") from None
        assert_logged_once(server, cid)
    # A body that ends early never reaches a service: the echo would have answered 200.
    assert "RecursionError" not in server.log()


def test_faults_answer_json_with_a_cid_and_one_log_line(esb_server, monkeypatch):
    server = deployed_server(esb_server, None, monkeypatch)
    workers = sorted(server.worker_pids())
    check_service_faults(server)
    check_service_answers_that_stay_valid(server)
    check_recursive_invoke(server)
    check_deep_json(server)
    check_bad_requests(server)
    # No fault took a worker down: the same workers serve on.
    assert sorted(server.worker_pids()) == workers
    assert server.post("/demo/echo", {"after": 1}).json() == {"after": 1}


# -- slow and lying clients ---------------------------------------------------------


def test_stalled_bodies_hold_no_worker(esb_server, monkeypatch):
    """3,000 connections announce a body and send one byte of it: every worker keeps
    answering, and after body_timeout_s each of them gets 408 and is closed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < STALLED + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, STALLED + 1000), hard))
    server = deployed_server(esb_server, None, monkeypatch, conf={("http", "body_timeout_s"): BODY_TIMEOUT_S})
    workers = set(server.worker_pids())
    assert len(workers) == 2
    head = b"POST /demo/echo HTTP/1.1\r\nHost: esb\r\nContent-Length: 1000\r\n\r\n{"
    stalled: list[socket.socket] = []
    try:
        for _ in range(STALLED):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(head)
            stalled.append(sock)
        # Still within body_timeout_s of the last one: both workers answer, on fresh connections.
        seen: set[int] = set()

        def both_workers_answer() -> bool:
            response = server.session.post(server.url("/t/pid"), data=b"{}", timeout=5,
                                            headers={"Connection": "close"})
            seen.add(response.json()["pid"])
            ping = server.session.get(server.url("/esb/ping"), timeout=5, headers={"Connection": "close"})
            assert ping.status_code == 200
            return seen == workers

        wait_until(both_workers_answer, timeout_s=60, interval_s=0.01, message="both workers answering")
        # Each stalled connection ends with a 408 and is closed by the server.
        for sock in stalled:
            sock.settimeout(BODY_TIMEOUT_S + 60)
            assert_raw_error(read_to_eof(sock), 408)
    finally:
        for sock in stalled:
            sock.close()
    assert set(server.worker_pids()) == workers
    assert server.post("/demo/hello", {}).json() == {"hello": "world"}


# -- no code from the working directory ------------------------------------------------


def test_start_runs_no_module_of_the_working_directory(esb_server, tmp_path):
    """`esb start` from a directory holding redis.py, gevent.py and falcon.py: the server
    starts, serves and deploys, and none of those files ever runs."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    for name in ("redis", "gevent", "falcon", "gunicorn", "esb"):
        (evil / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
            f"raise RuntimeError('{name}.py of the working directory was imported')\n"
        )
    server = esb_server(start=False)
    console = Path(sys.executable).parent / "esb"
    assert console.exists(), console

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(console), *args], cwd=evil, capture_output=True, text=True, timeout=120)

    try:
        started = run("start", str(server.directory))
        assert started.returncode == 0, started.stdout + started.stderr
        assert server.answers()
        module = Path(__file__).parent / "deployables" / "httptest.py"
        deployed = run("deploy", str(server.directory), str(module))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        wait_until(lambda: server.invoke("t.pid").status_code == 200, message="the deployed module serving")
    finally:
        esb("stop", str(server.directory), timeout_s=90)
    assert not marker.exists(), marker.read_text()
