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
    queue_dead_letter(pipe, keys, entry_id, fields, 3, "its worker died", max_len=10)
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


def _consumer(redis_client, cluster, ran: list, **settings):
    from esb.config.server_conf import DispatchSection
    from esb.server.consumer import DispatchConsumer

    return DispatchConsumer(
        client=redis_client, reader=redis_client, keys=Keys(cluster), consumer_name="me:1:1",
        settings=DispatchSection(reclaim_idle_s=0.2, **settings),
        run=lambda message: ran.append(message.payload) or None, redis_url=REDIS_URL,
    )


def _read_as(redis_client, keys: Keys, consumer: str) -> str:
    [[_stream, [(entry_id, _fields)]]] = redis_client.xreadgroup(
        keys.dispatch_group, consumer, {keys.dispatch: ">"}, count=1
    )
    return entry_id


def test_reclaim_takes_only_from_consumers_without_liveness(redis_client, cluster):
    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    ran: list = []
    consumer = _consumer(redis_client, cluster, ran)
    enqueue(redis_client, keys, "t.s", {"of": "live"})
    enqueue(redis_client, keys, "t.s", {"of": "dead"})
    enqueue(redis_client, keys, "t.s", {"of": "orphan"})
    redis_client.set(keys.consumer_alive("live:1:1"), "1", px=60000)
    _read_as(redis_client, keys, "live:1:1")
    _read_as(redis_client, keys, "dead:1:1")
    _read_as(redis_client, keys, "me:1:1")  # ours, but not in inflight: left after an error

    def reclaimed_two() -> bool:
        consumer.reclaim(10)
        consumer.pool.join(timeout=5)
        return len(ran) >= 2

    wait_until(reclaimed_two, message="the dead consumer's and the orphaned entries reclaimed")
    assert sorted(p["of"] for p in ran) == ["dead", "orphan"]
    pending = redis_client.xpending_range(keys.dispatch, keys.dispatch_group, "-", "+", 10)
    assert {p["consumer"] for p in pending} == {"live:1:1", "me:1:1"}

    def dead_consumer_dropped() -> bool:  # nothing left pending: dropped at a later round
        consumer.reclaim(10)
        names = {c["name"] for c in redis_client.xinfo_consumers(keys.dispatch, keys.dispatch_group)}
        return "dead:1:1" not in names and {"live:1:1", "me:1:1"} <= names

    wait_until(dead_consumer_dropped, timeout_s=5, message="the dead consumer dropped from the group")


def test_reclaim_dead_letters_past_max_deliveries(redis_client, cluster):
    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    ran: list = []
    consumer = _consumer(redis_client, cluster, ran, max_deliveries=1)
    msg_id = enqueue(redis_client, keys, "t.s", {"of": "poison"}, cid="poison-cid")
    _read_as(redis_client, keys, "dead:1:1")  # delivery 1: its worker died

    def dead_lettered() -> bool:
        consumer.reclaim(10)
        return redis_client.xlen(keys.dead_letters) == 1

    wait_until(dead_lettered, message="the message dead-lettered")
    assert ran == []
    [letter] = dead_letters(redis_client, keys)
    assert letter.message.msg_id == msg_id and letter.message.cid == "poison-cid"
    assert letter.deliveries == 1 and "dead:1:1" in letter.last_error
    assert redis_client.xlen(keys.dispatch) == 0
    assert redis_client.xpending(keys.dispatch, keys.dispatch_group)["pending"] == 0


def test_a_worker_that_goes_on_after_a_reclaim_leaves_the_entry_to_its_new_holder(redis_client, cluster):
    """A worker stopped past reclaim_idle_s goes on: what another consumer took over meanwhile
    is that consumer's. A run it finishes late is not acknowledged (the entry, and with it
    the job's in-flight marker, stays with the run that took over), and entries a read
    blocked across the stop handed it are not run when another consumer holds them."""
    from esb.bus import DispatchMessage
    from esb.server.consumer import Finished

    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    ran: list = []
    consumer = _consumer(redis_client, cluster, ran)
    ids = [enqueue(redis_client, keys, "t.s", {"of": of}) for of in ("late", "mine", "read", "unread")]
    late, mine, read, unread = (_read_as(redis_client, keys, "me:1:1") for _ in ids)
    redis_client.xclaim(keys.dispatch, keys.dispatch_group, "other:1:1", 0, [late, read])

    def finished(entry_id: str) -> Finished:
        [(_, fields)] = redis_client.xrange(keys.dispatch, entry_id, entry_id)
        return Finished(entry_id, DispatchMessage.from_fields(fields), ran=True, duration_s=1.0)

    consumer._write_finished([finished(late), finished(mine)])
    assert [e for e, _ in redis_client.xrange(keys.dispatch)] == [late, read, unread]
    consumer.submit_read([(e, f) for e, f in redis_client.xrange(keys.dispatch) if e in (read, unread)],
                         waited_s=60)
    consumer.pool.join(timeout=5)
    assert [p["of"] for p in ran] == ["unread"]
    holders = {p["message_id"]: p["consumer"]
               for p in redis_client.xpending_range(keys.dispatch, keys.dispatch_group, "-", "+", 10)}
    assert holders[late] == holders[read] == "other:1:1"
