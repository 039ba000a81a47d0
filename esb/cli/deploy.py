"""`esb deploy DIR FILE...`: hot-deploy service modules or definition files, cluster-wide."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esb.bus import Keys, make_redis
from esb.cli.common import FAILURE, OK, load_or_exit
from esb.deploy import Deployer
from esb.errors import ConfigError, DeployError, OdbUnavailable
from esb.odb import OdbStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("deploy", help="hot-deploy .py service modules or .toml definitions")
    p.add_argument("directory")
    p.add_argument("files", nargs="+")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    deployer = Deployer(
        OdbStore(config.odb_url), make_redis(config.redis_url, retries=1), Keys(config.main.cluster)
    )
    code = OK
    for name in args.files:
        try:
            print(deployer.deploy(Path(name)))
        except (DeployError, ConfigError) as exc:
            print(f"esb: rejected {exc}; the previous version keeps serving", file=sys.stderr)
            code = FAILURE
        except OdbUnavailable as exc:
            print(f"esb: {name} not deployed: {exc}", file=sys.stderr)
            code = FAILURE
    return code
