"""A small HTTP/1.1 load generator, the fallback of `make bench` when wrk is not installed.

Several processes, each driving its share of keep-alive connections from one
``selectors`` loop: every connection sends one POST, reads the whole answer (by
Content-Length), and sends the next. No pipelining, like wrk. Usage:

    python bench/loadgen.py URL --body JSON [--connections 50] [--processes 2] [--seconds 8]

Prints one JSON line: requests, non-2xx answers, socket errors, seconds, requests_per_s.
Slower per request than wrk: `bench/run.py` measures its CPU use and says when it, rather
than the server, was the limit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import selectors
import socket
import time
from urllib.parse import urlsplit


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("ascii") + body


class Conn:
    """One keep-alive connection: the bytes read so far of the answer in progress."""

    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""


def _answer_end(buf: bytes) -> tuple[int, int] | None:
    """(status, length of the whole answer) once BUF holds a complete answer, else None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].lower()
    start = head.find(b"content-length:")
    length = 0
    if start >= 0:
        stop = head.find(b"\r\n", start)
        length = int(head[start + 15 : stop if stop >= 0 else None])
    total = head_end + 4 + length
    if len(buf) < total:
        return None
    return int(buf[9:12]), total


def drive(host: str, port: int, request: bytes, connections: int, seconds: float, out) -> None:
    """One process's share: CONNECTIONS connections for SECONDS; counts sent to OUT."""
    sel = selectors.DefaultSelector()
    ok = bad = errors = 0

    def open_conn() -> None:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, Conn(sock))
        sock.sendall(request)

    for _ in range(connections):
        open_conn()
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        for key, _events in sel.select(timeout=0.2):
            conn: Conn = key.data
            try:
                chunk = conn.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                errors += 1
                sel.unregister(conn.sock)
                conn.sock.close()
                open_conn()
                continue
            conn.buf += chunk
            done = _answer_end(conn.buf)
            if done is None:
                continue
            status, total = done
            conn.buf = conn.buf[total:]
            if 200 <= status < 300:
                ok += 1
            else:
                bad += 1
            conn.sock.sendall(request)
    elapsed = time.monotonic() - started
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    out.put((ok, bad, errors, elapsed))


def run(url: str, body: bytes, connections: int, processes: int, seconds: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(host, port, parts.path or "/", body)
    queue: multiprocessing.Queue = multiprocessing.Queue()
    shares = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    procs = [
        multiprocessing.Process(target=drive, args=(host, port, request, share, seconds, queue))
        for share in shares
        if share
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 30) for _ in procs]
    for proc in procs:
        proc.join()
    ok = sum(r[0] for r in results)
    bad = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    elapsed = max(r[3] for r in results)
    return {
        "requests": ok + bad,
        "non_2xx": bad,
        "socket_errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": round((ok + bad) / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--body", default='{"name": "esb"}')
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.url, args.body.encode(), args.connections, args.processes, args.seconds)))


if __name__ == "__main__":
    main()
