"""`esb check-config DIR`: validate server.conf and config/*.toml without starting."""

from __future__ import annotations

import argparse
import sys

from esb.cli.common import BAD_CONFIG, OK, load_or_exit
from esb.config import merge_units
from esb.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check-config", help="validate server.conf and object definitions")
    p.add_argument("directory")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    for sentence in config.deprecations:
        print(f"esb: warning: {sentence}", file=sys.stderr)
    units = [
        (str(path.relative_to(config.directory)), path.read_text(encoding="utf-8"))
        for path in sorted(config.config_dir.glob("*.toml"))
    ]
    try:
        definitions = merge_units(units, environ=None)
    except ConfigError as exc:
        print(f"esb: {exc}", file=sys.stderr)
        return BAD_CONFIG
    counts = ", ".join(f"{len(objs)} {kind}" for kind, objs in sorted(definitions.objects.items()))
    print(f"server.conf ok; {len(units)} definition files ok ({counts or 'no objects'})")
    return OK
