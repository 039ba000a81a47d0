"""The `esb` command: one module per subcommand, each parses, calls a subsystem, maps errors
to exit codes (0 ok, 1 failure, 2 bad configuration or usage)."""

from __future__ import annotations

import argparse
import sys

from esb.cli import (
    check_config,
    dead_letters,
    deploy,
    invoke,
    jobs,
    notifications,
    quickstart,
    start,
    status,
    stop,
    undeploy,
)
from esb.config import render_example

COMMANDS = (
    quickstart,
    start,
    stop,
    status,
    jobs,
    notifications,
    deploy,
    undeploy,
    invoke,
    check_config,
    dead_letters,
)


def _config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(render_example())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esb", description="esb, the enterprise service bus")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    example = subparsers.add_parser("config-example", help="print server.conf.example")
    example.set_defaults(handler=_config_example)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.handler(args))
