"""Fair workers: on one worker, 50 keep-alive connections each sending requests back to back
are all served, none starved while a few others are served in bursts.

The client keeps a few requests in flight on each connection (pipelined), so that the next
request of a connection is always already in the server's socket buffer: the case in which
a gevent greenlet that never blocks would keep the worker to itself. The assertion is on the
counts answered per connection, not on any timing.
"""

from __future__ import annotations

import selectors
import socket
import time

from tests.helpers import Server

CONNECTIONS = 50
IN_FLIGHT = 64  # requests outstanding on each connection at any time
MAX_SECONDS = 4.0
MAX_ANSWERS = 40_000  # the run ends at whichever bound comes first
BODY = b'{"name": "esb", "items": [1, 2, 3]}'


def request(port: int) -> bytes:
    head = (
        f"POST /demo/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


def take_answers(buffer: bytearray) -> list[int]:
    """Remove the whole answers at the start of BUFFER; return their statuses."""
    statuses = []
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return statuses
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(buffer) < end + 4 + length:
            return statuses
        statuses.append(int(head[0].split()[1]))
        del buffer[: end + 4 + length]


def answers_per_connection(port: int) -> list[int]:
    """Drive CONNECTIONS keep-alive connections with IN_FLIGHT requests each; the number of
    200 answers each got before MAX_SECONDS or MAX_ANSWERS in all."""
    one = request(port)
    selector = selectors.DefaultSelector()
    conns = []
    for index in range(CONNECTIONS):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(conn)
        selector.register(conn, selectors.EVENT_READ, index)
    counts = [0] * CONNECTIONS
    buffers = [bytearray() for _ in range(CONNECTIONS)]
    try:
        # Every connection's first requests are sent before any answer is read.
        for conn in conns:
            conn.sendall(one * IN_FLIGHT)
        deadline = time.monotonic() + MAX_SECONDS
        while time.monotonic() < deadline and sum(counts) < MAX_ANSWERS:
            for key, _ in selector.select(timeout=0.5):
                index = key.data
                data = conns[index].recv(65536)
                assert data, f"connection {index} closed by the server after {counts[index]} answers"
                buffers[index] += data
                statuses = take_answers(buffers[index])
                assert set(statuses) <= {200}, statuses
                counts[index] += len(statuses)
                if statuses:
                    conns[index].sendall(one * len(statuses))  # back to IN_FLIGHT outstanding
    finally:
        selector.close()
        for conn in conns:
            conn.close()
    return counts


def test_no_connection_starved_on_one_worker(esb_server):
    server: Server = esb_server(workers=1)
    counts = answers_per_connection(server.port)
    mean = sum(counts) / len(counts)
    summary = f"answers per connection: min {min(counts)}, mean {mean:.0f}, max {max(counts)}; {counts}"
    print(summary)
    assert sum(counts) >= CONNECTIONS, summary
    assert min(counts) >= mean / 4, summary
    # The worker is still whole and answering.
    assert server.answers()
