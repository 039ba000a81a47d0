"""The consuming baseline of bench/amqp_bench.py: a bare kombu consumer, gevent-patched.

It consumes QUEUE with the prefetch an AMQP channel has by default, decodes each JSON
body (kombu's ``Consumer`` does, before its callback), calls a callback that does
nothing and acknowledges the message: what a consumer written with kombu alone does,
in the kind of process an esb worker is. It runs until SIGTERM, which ends it at once. Usage:

    python bench/bare_consumer.py --queue Q [--url amqp://...] [--prefetch 100]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import kombu  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", required=True)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--prefetch", type=int, default=100)
    args = parser.parse_args()
    # The bench stops it once the queue is drained: nothing to finish, and waiting for a
    # busy broker's close handshake only delays the next round.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

    def on_message(body: object, message: kombu.Message) -> None:
        message.ack()

    with kombu.Connection(args.url, heartbeat=30) as conn:
        queue = kombu.Queue(args.queue, no_declare=True)
        with conn.Consumer(queue, callbacks=[on_message], accept=["json"], prefetch_count=args.prefetch):
            while True:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    conn.heartbeat_check()


if __name__ == "__main__":
    sys.exit(main())
