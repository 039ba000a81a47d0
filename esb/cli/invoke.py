"""`esb invoke DIR SERVICE [JSON]`: run a service through the admin API, print its response."""

from __future__ import annotations

import argparse
import json
import sys

from esb.cli.common import FAILURE, OK, admin_request, load_or_exit


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("invoke", help="invoke a service and print its response")
    p.add_argument("directory")
    p.add_argument("service")
    p.add_argument("payload", nargs="?", default="{}", help="JSON payload (default {})")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    try:
        json.loads(args.payload)
    except ValueError as exc:
        print(f"esb: the payload is not JSON: {exc}", file=sys.stderr)
        return FAILURE
    try:
        status, body = admin_request(config, "POST", f"/esb/invoke/{args.service}", args.payload.encode())
    except OSError as exc:
        print(f"esb: the server does not answer: {exc}", file=sys.stderr)
        return FAILURE
    out = sys.stdout if 200 <= status < 300 else sys.stderr
    print(body.decode("utf-8", "replace"), file=out)
    return OK if 200 <= status < 300 else FAILURE
