"""`esb undeploy DIR NAME`: remove a service module or a definitions unit, cluster-wide.

A unit that a file in config/ defines is deployed again by every start: undeploying it
says so, naming the file, rather than let it come back unannounced."""

from __future__ import annotations

import argparse
import sys

from esb.cli.common import FAILURE, OK, load_or_exit
from esb.cli.deploy import make_deployer
from esb.errors import ConfigError, DeployError, OdbUnavailable


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "undeploy", help="remove a module (orders, orders.py) or a definitions unit (orders.toml)"
    )
    p.add_argument("directory")
    p.add_argument("name")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    try:
        print(make_deployer(config).undeploy(args.name))
        comes_back = config.config_dir / args.name
        if args.name.endswith(".toml") and comes_back.is_file():
            shown = comes_back.relative_to(config.directory)
            print(
                f"esb: warning: {shown} defines this unit, and every esb start deploys config/ again: "
                f"remove {shown} too, or the unit comes back at the next start",
                file=sys.stderr,
            )
    except (DeployError, ConfigError) as exc:
        print(f"esb: refused {exc}; nothing was removed", file=sys.stderr)
        return FAILURE
    except OdbUnavailable as exc:
        print(f"esb: {args.name} not undeployed: {exc}", file=sys.stderr)
        return FAILURE
    return OK
