"""What Redis keeps of the dispatch stream is bounded by the rate, not by the history: a
finished message leaves no key behind, the dead-letter stream has a cap, consumers of dead
workers leave the group, and the dead letters' commands say when an id names nothing."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from esb.bus import Keys, enqueue, ensure_group
from esb.bus.dispatch import queue_dead_letter
from tests.helpers import esb, wait_until
from tests.integration.http_support import DEPLOYABLES
from tests.integration.test_dead_letters import _consumer, _read_as

MESSAGES = 20_000
SUBMITTERS = 4
# A server's own keys (stream, heartbeats, liveness, lease, the test's counter...): a few
# per process, none per message.
FIXED_KEYS_AT_MOST = 30


def keys_under(redis_client, cluster: str) -> list[str]:
    return sorted(redis_client.scan_iter(match=f"esb:{cluster}:*", count=1000))


def test_twenty_thousand_invoke_async_leave_no_key_per_message(esb_server, redis_client, cluster):
    """The bound is checked as the last message finished, not a minute later: nothing
    per message outlives it, so the minute after cannot hold more."""
    server = esb_server(workers=2)
    done = server.deploy(DEPLOYABLES / "fanout.py")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    keys = Keys(cluster)
    counter = f"esb:{cluster}:test:fanout"
    wait_until(lambda: server.invoke("fanout.burst", {"key": counter + ":warmup", "count": 1}).ok,
               message="fanout services deployed")

    def submit(_: int) -> int:
        answer = server.invoke("fanout.burst", {"key": counter, "count": MESSAGES // SUBMITTERS})
        assert answer.status_code == 200, answer.text
        return answer.json()["queued"]

    with ThreadPoolExecutor(SUBMITTERS) as submitters:
        assert sum(submitters.map(submit, range(SUBMITTERS))) == MESSAGES
    wait_until(lambda: int(redis_client.get(counter) or 0) >= MESSAGES, timeout_s=90, interval_s=0.5,
               message=f"{MESSAGES} messages run")
    wait_until(lambda: redis_client.xlen(keys.dispatch) == 0
               and redis_client.xpending(keys.dispatch, keys.dispatch_group)["pending"] == 0,
               message="every message acknowledged and deleted")
    assert int(redis_client.get(counter)) == MESSAGES  # each ran once

    left = keys_under(redis_client, cluster)
    assert len(left) <= FIXED_KEYS_AT_MOST, f"{len(left)} keys, for example {left[:5]}"
    consumers = redis_client.xinfo_consumers(keys.dispatch, keys.dispatch_group)
    assert len(consumers) <= server.workers


def test_dead_letter_stream_is_capped_and_status_tells_count_and_age(esb_server, redis_client, cluster):
    server = esb_server(start=False)
    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    consumer = _consumer(redis_client, cluster, [], max_deliveries=1, dead_letters_max=5)
    for n in range(8):
        enqueue(redis_client, keys, "t.poison", {"n": n})
        _read_as(redis_client, keys, "dead:1:1")  # a consumer without liveness: dead

    def all_dead_lettered() -> bool:
        consumer.reclaim(100)
        return redis_client.xlen(keys.dispatch) == 0

    wait_until(all_dead_lettered, message="the dead consumer's messages dead-lettered")
    kept = [json.loads(fields["payload"])["n"] for _, fields in redis_client.xrange(keys.dead_letters)]
    assert kept == [3, 4, 5, 6, 7]  # the newest, up to the cap

    status = esb("status", str(server.directory), "--json")
    dispatch = json.loads(status.stdout)["dispatch"]
    assert dispatch["dead_letters"] == 5
    assert 0 <= dispatch["oldest_dead_letter_age_s"] < 60
    text = esb("status", str(server.directory)).stdout
    assert "5 dead letters" in text and "oldest" in text


def test_consumers_of_dead_workers_leave_the_group(redis_client, cluster):
    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    ran: list = []
    consumer = _consumer(redis_client, cluster, ran)
    redis_client.set(keys.consumer_alive("live:1:1"), "1", px=60000)
    for name in ("gone:1:1", "live:1:1"):  # nothing pending: all they read was acknowledged
        redis_client.xgroup_createconsumer(keys.dispatch, keys.dispatch_group, name)
    enqueue(redis_client, keys, "t.s", {"of": "held"})
    _read_as(redis_client, keys, "held:1:1")  # dead, with a message pending

    def names() -> set[str]:
        return {c["name"] for c in redis_client.xinfo_consumers(keys.dispatch, keys.dispatch_group)}

    def dead_ones_gone() -> bool:
        consumer.reclaim(10)
        consumer.pool.join(timeout=5)
        return not names() & {"gone:1:1", "held:1:1"}

    wait_until(dead_ones_gone, timeout_s=10, message="the dead consumers removed from the group")
    assert "live:1:1" in names()
    # The held message was taken over before its consumer went: nothing was lost with it.
    assert ran == [{"of": "held"}]
    [pending] = redis_client.xpending_range(keys.dispatch, keys.dispatch_group, "-", "+", 10)
    assert pending["consumer"] == "me:1:1"


def test_dead_letters_drop_and_retry_of_an_id_that_names_nothing_say_so(esb_server, redis_client, cluster):
    server = esb_server(start=False)
    keys = Keys(cluster)
    ensure_group(redis_client, keys)
    enqueue(redis_client, keys, "t.s", {})
    entry_id = _read_as(redis_client, keys, "c:1:1")
    [(_, fields)] = redis_client.xrange(keys.dispatch, entry_id, entry_id)
    pipe = redis_client.pipeline(transaction=True)
    queue_dead_letter(pipe, keys, entry_id, fields, 3, "its worker died", max_len=10)
    pipe.execute()
    for action in ("drop", "retry"):
        for bad in ("no-such-id", "1-1", "+"):
            done = esb("dead-letters", str(server.directory), action, bad)
            assert done.returncode != 0, (action, bad, done.stdout)
            assert f"no dead letter {bad}" in done.stderr, (action, bad, done.stderr)
            assert "unreachable" not in done.stderr
    assert redis_client.xlen(keys.dead_letters) == 1  # the real one untouched
