"""A redelivered AMQP message runs alone in its worker, so a worker's death counts against it
only; the others run side by side as before."""

import gevent

from esb.outgoing.amqp.deliveries import Alone


def test_a_run_alone_waits_for_the_usual_ones_and_none_starts_beside_it():
    runs = Alone()
    running: set[str] = set()
    beside: list[tuple[str, set[str]]] = []

    def run(name: str, alone: bool, seconds: float) -> None:
        with runs.alone() if alone else runs.usual():
            beside.append((name, set(running)))
            running.add(name)
            gevent.sleep(seconds)
            running.discard(name)

    gevent.joinall([
        gevent.spawn(run, "u1", False, 0.05),
        gevent.spawn(run, "u2", False, 0.02),
        gevent.spawn(run, "a1", True, 0.02),
        gevent.spawn(run, "u3", False, 0.01),
        gevent.spawn(run, "a2", True, 0.02),
        gevent.spawn(run, "u4", False, 0.01),
    ], raise_error=True)
    seen = dict(beside)
    assert len(seen) == 6 and not running
    assert seen["u2"] == {"u1"}  # usual runs side by side
    assert seen["a1"] == set() and seen["a2"] == set()
    assert all(not {"a1", "a2"} & others for others in seen.values())
