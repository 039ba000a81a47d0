"""The worker's replacements of gunicorn's per-request helpers answer exactly as gunicorn's."""

from __future__ import annotations

import email.utils
import ipaddress
import time

import gevent
from gevent import socket as gsocket
from gunicorn import util
from gunicorn.http import message

from esb.server import gunicorn_tuning


def test_the_date_is_gunicorns_for_the_current_second_and_any_given_time() -> None:
    http_date = gunicorn_tuning.cached_http_date(util.http_date)
    before = int(time.time())
    answer = http_date()
    after = int(time.time())
    assert answer in {email.utils.formatdate(s, usegmt=True) for s in range(before, after + 1)}
    assert http_date() == http_date()
    assert http_date(86400 * 365) == util.http_date(86400 * 365)


def test_the_allow_list_answers_as_gunicorns_per_list_and_per_peer() -> None:
    check = gunicorn_tuning.cached_allow_list(message._ip_in_allow_list)
    lists = [
        (["127.0.0.1", "::1"], [ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("::1")]),
        (["10.0.0.0/8"], [ipaddress.ip_network("10.0.0.0/8")]),
        (["*"], []),
    ]
    for peer in ["127.0.0.1", "::1", "10.1.2.3", "192.168.0.1", "not an address"]:
        for allow_list, networks in lists:
            for _ in range(2):  # the second answer comes from the table
                expected = message._ip_in_allow_list(peer, allow_list, networks)
                assert check(peer, allow_list, networks) == expected


def test_write_sends_everything_in_order_also_past_the_socket_buffer() -> None:
    write = gunicorn_tuning.direct_write(util.write_chunk)
    left, right = gsocket.socketpair()
    data = bytes(range(256)) * 40_000  # 10 MB: far past one send's worth
    received = bytearray()

    def read() -> None:
        while len(received) < len(data) + 5:
            chunk = right.recv(1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    reader = gevent.spawn(read)
    write(left, b"small")
    write(left, data)
    reader.join(timeout=30)
    assert bytes(received) == b"small" + data
    write(left, b"body", True)
    assert right.recv(100) == b"4\r\nbody\r\n"
    left.close()
    right.close()
