"""A stand-in worker for the scheduler tests: esb's own ``DispatchConsumer`` in a gevent
process, as a worker runs it, with a "service" that appends each message it runs to a file.

The consumer is the real one: it keeps no record of finished messages and runs every new
stream entry, so a firing that the scheduler put on the stream twice runs twice and shows in the file.
The file lives outside Redis, so it survives a Redis that restarts and loses its data.

    python -m tests.integration.stand_in_worker REDIS_URL CLUSTER RUNS_FILE RUN_S

It creates ``RUNS_FILE.ready`` once it consumes, and stops gracefully on SIGTERM.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

from esb.bus import DispatchMessage, Keys, make_blocking_reader, make_redis  # noqa: E402
from esb.bus.jobstate import record_run  # noqa: E402
from esb.config.server_conf import DispatchSection  # noqa: E402
from esb.server.consumer import DispatchConsumer, consumer_name  # noqa: E402


def main(argv: list[str]) -> int:
    url, cluster, runs_path, run_s = argv[0], argv[1], Path(argv[2]), float(argv[3])
    keys = Keys(cluster)
    client = make_redis(url, socket_timeout_s=1.0)
    runs = runs_path.open("a", encoding="utf-8")

    def run(message: DispatchMessage) -> str | None:
        job = message.job or {}
        runs.write(json.dumps({
            "job": job.get("name"), "firing_id": job.get("firing_id"),
            "scheduled_at": job.get("scheduled_at"), "payload": message.payload,
            "started": time.time(), "msg_id": message.msg_id,
        }) + "\n")
        runs.flush()
        if run_s:
            gevent.sleep(run_s)
        return None

    def record(pipe, message: DispatchMessage, duration_s: float, error: str | None) -> None:
        if message.job:
            record_run(pipe, keys, message.job["name"], message.job["firing_id"], duration_s, error)

    consumer = DispatchConsumer(
        client=client,
        reader=make_blocking_reader(url, block_s=1.0),
        keys=keys,
        consumer_name=consumer_name(socket.gethostname(), os.getpid()),
        settings=DispatchSection(),
        run=run,
        record=record,
        redis_url=url,
    )
    stopping = Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    consumer.start()
    Path(f"{runs_path}.ready").touch()
    stopping.wait()
    consumer.stop(timeout_s=2)
    runs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
