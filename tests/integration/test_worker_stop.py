"""`esb stop` with keep-alive connections open: the idle ones are closed by the server, a
request in flight still gets its whole answer, and no process is left behind."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from tests.helpers import Server, esb, pid_alive, wait_until

HELD = '''
import os

import gevent

from esb import Service


class Held(Service):
    """Touches payload["started"], then answers once payload["release"] exists."""

    name = "t.held"

    def handle(self):
        open(self.request.payload["started"], "w").close()
        for _ in range(1200):  # 60 s at most
            if os.path.exists(self.request.payload["release"]):
                break
            gevent.sleep(0.05)
        self.response.payload = {"released": True}
'''

HELD_TOML = '''
[[channel.http]]
name = "t-held"
path = "/t/held"
service = "t.held"
'''


def post(conn: socket.socket, port: int, path: str, body: bytes) -> None:
    conn.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def read_answer(conn: socket.socket) -> bytes:
    """One whole answer with a Content-Length, head and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        body += chunk
    assert len(body) == length, "nothing after the answer"
    return head + b"\r\n\r\n" + body


def read_to_close(conn: socket.socket) -> bytes:
    """All the server sends until it closes the connection."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def test_stop_closes_idle_connections_and_finishes_requests_in_flight(esb_server, tmp_path: Path):
    server: Server = esb_server(workers=1)
    (tmp_path / "held.py").write_text(HELD)
    (tmp_path / "held.toml").write_text(HELD_TOML)
    for name in ("held.py", "held.toml"):
        done = server.deploy(tmp_path / name)
        assert done.returncode == 0, done.stdout + done.stderr
    started, release = tmp_path / "started", tmp_path / "release"
    wait_until(lambda: server.post("/t/held", {"started": str(started), "release": str(tmp_path)})
               .status_code == 200, message="t.held deployed")
    started.unlink()

    # Five connections that had one answer each and now wait for their next request.
    idle = []
    for _ in range(5):
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        post(conn, server.port, "/demo/echo", b'{"n": 1}')
        assert read_answer(conn).startswith(b"HTTP/1.1 200"), "echo answered"
        idle.append(conn)
    # One request in flight, held by the service until the test releases it.
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    post(busy, server.port, "/t/held", f'{{"started": "{started}", "release": "{release}"}}'.encode())
    wait_until(started.exists, message="the held request is in the service")

    result: list = []
    directory = str(server.directory)
    stopping = threading.Thread(target=lambda: result.append(esb("stop", directory, timeout_s=90)))
    pids = server.all_pids()
    stopping.start()
    try:
        # The idle connections are closed by the server with nothing more sent, while the
        # held request is still running.
        for conn in idle:
            assert read_to_close(conn) == b""
        assert stopping.is_alive() and not release.exists()
    finally:
        release.touch()
        for conn in idle:
            conn.close()
    answer = read_to_close(busy)  # the whole answer...
    busy.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    # ...and then the server closed that connection (read_to_close returned).
    assert b'"released": true' in body, body
    stopping.join(90)
    assert result and result[0].returncode == 0, result
    wait_until(lambda: not [pid for pid in pids if pid_alive(pid)], message="no process of the server left")
