"""`esb dead-letters DIR [list|retry ID|drop ID]`: dispatch messages given up on.

A message whose worker died ``[dispatch] max_deliveries`` times while running it is moved
to the dead-letter stream; here an operator reads why, puts it back on the dispatch stream
once the service is fixed, or drops it for good.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from redis.exceptions import RedisError

from esb.bus import Keys, make_redis
from esb.bus.dispatch import DeadLetter, dead_letters, drop_dead_letter, retry_dead_letter
from esb.cli.common import BAD_CONFIG, FAILURE, OK, load_or_exit, print_json

ACTIONS = ("list", "retry", "drop")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dead-letters", help="list, re-queue or drop dead-lettered dispatch messages")
    p.add_argument("directory")
    p.add_argument("action", nargs="?", default="list", choices=ACTIONS)
    p.add_argument("id", nargs="?", help="the dead letter's id (retry, drop)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(handler=run)


def as_dict(letter: DeadLetter) -> dict:
    message = letter.message
    return {
        "id": letter.entry_id,
        "msg_id": message.msg_id,
        "service": message.service,
        "payload": message.payload,
        "cid": message.cid,
        "job": message.job,
        "deliveries": letter.deliveries,
        "last_error": letter.last_error,
        "dead_at": dt.datetime.fromtimestamp(letter.dead_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _no_such(args: argparse.Namespace) -> int:
    print(f"esb: no dead letter {args.id} (an id looks like 1733312345678-0; "
          f"'esb dead-letters {args.directory}' lists them)", file=sys.stderr)
    return FAILURE


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    if args.action != "list" and not args.id:
        print(f"esb: dead-letters {args.action} needs the id of a dead letter", file=sys.stderr)
        return BAD_CONFIG
    client = make_redis(config.redis_url, socket_timeout_s=3.0, retries=1)
    keys = Keys(config.main.cluster)
    try:
        if args.action == "list":
            letters = [as_dict(letter) for letter in dead_letters(client, keys)]
            if args.json:
                print_json(letters)
            elif not letters:
                print("no dead letters")
            for letter in [] if args.json else letters:
                print(
                    f"{letter['id']} {letter['service']} cid {letter['cid']} "
                    f"deliveries {letter['deliveries']} at {letter['dead_at']}: {letter['last_error']}\n"
                    f"    payload {json.dumps(letter['payload'])}"
                )
            return OK
        if args.action == "retry":
            entry_id = retry_dead_letter(client, keys, args.id)
            if entry_id is None:
                return _no_such(args)
            print(f"dead letter {args.id} re-queued as dispatch entry {entry_id}")
            return OK
        if not drop_dead_letter(client, keys, args.id):
            return _no_such(args)
        print(f"dead letter {args.id} dropped")
        return OK
    except RedisError as exc:
        print(f"esb: Redis unreachable: {exc}", file=sys.stderr)
        return FAILURE
