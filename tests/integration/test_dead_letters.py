"""Dead letters and consumer liveness against real Redis, without a server."""

from __future__ import annotations

import time

from esb.bus import Keys, enqueue, ensure_group
from esb.bus.dispatch import dead_letters, drop_dead_letter, queue_dead_letter, retry_dead_letter
from esb.server.liveness import NativeLiveness
from tests.conftest import REDIS_URL
from tests.helpers import free_port, wait_until


def test_dead_letter_keeps_the_message_and_retry_requeues_it(redis_client, cluster):
    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    msg_id = enqueue(redis_client, keys, "t.s", {"a": 1}, cid="cid-1")
    [[_stream, [(entry_id, fields)]]] = redis_client.xreadgroup(
        keys.dispatch_group, "c1", {keys.dispatch: ">"}, count=1
    )
    pipe = redis_client.pipeline(transaction=True)
    queue_dead_letter(pipe, keys, entry_id, fields, 3, "its worker died")
    pipe.execute()
    assert redis_client.xlen(keys.dispatch) == 0
    assert redis_client.xpending(keys.dispatch, keys.dispatch_group)["pending"] == 0

    [letter] = dead_letters(redis_client, keys)
    message = letter.message
    assert (message.msg_id, message.service, message.payload) == (msg_id, "t.s", {"a": 1})
    assert letter.message.cid == "cid-1" and letter.deliveries == 3 and letter.last_error == "its worker died"

    assert retry_dead_letter(redis_client, keys, letter.entry_id)
    assert dead_letters(redis_client, keys) == []
    [[_stream, [(_new_id, requeued)]]] = redis_client.xreadgroup(
        keys.dispatch_group, "c1", {keys.dispatch: ">"}, count=1
    )
    assert requeued == fields  # the same message, without the dead letter's own fields
    assert retry_dead_letter(redis_client, keys, letter.entry_id) is None
    assert not drop_dead_letter(redis_client, keys, letter.entry_id)


def test_native_liveness_keeps_its_key_and_lets_it_expire_when_stopped(redis_client, cluster):
    keys = Keys(cluster)
    key = keys.consumer_alive("h:1:1")
    liveness = NativeLiveness(REDIS_URL, key, ttl_s=1.0, interval_s=0.2)
    liveness.start()
    try:
        wait_until(lambda: redis_client.exists(key), message="liveness key set")
        # Refreshed: it outlives its TTL while the thread runs.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert redis_client.pttl(key) > 0
            time.sleep(0.1)
    finally:
        liveness.stop()
    wait_until(lambda: not redis_client.exists(key), timeout_s=5, message="liveness key expired")


def test_native_liveness_survives_an_unreachable_redis(redis_client, cluster):
    liveness = NativeLiveness(f"redis://127.0.0.1:{free_port()}/0", "k", ttl_s=1.0, interval_s=0.1)
    liveness.start()
    try:
        wait_until(lambda: liveness._retrying.failures >= 3, message="beats retried")
    finally:
        liveness.stop()


def test_native_liveness_over_a_unix_socket(tmp_path):
    """The embedded Redis is reached over a unix socket: the thread speaks to it too."""
    import shutil
    import subprocess

    import redis

    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(sock),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(sock), db=2)
    liveness = NativeLiveness(f"unix://{sock}?db=2", "alive", ttl_s=1.0, interval_s=0.2)
    try:
        wait_until(client.ping, message="unix-socket Redis answering")
        liveness.start()
        wait_until(lambda: client.pttl("alive") > 0, message="liveness key set over the unix socket")
    finally:
        liveness.stop()
        client.close()
        proc.kill()
        proc.wait(timeout=10)
