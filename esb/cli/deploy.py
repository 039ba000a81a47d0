"""`esb deploy DIR FILE...`: hot-deploy service modules or definition files, cluster-wide."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esb.bus import make_redis
from esb.cli.common import FAILURE, OK, load_or_exit
from esb.config import ServerConfig
from esb.deploy import Deployer, server_environment
from esb.errors import ConfigError, DeployError, OdbUnavailable
from esb.odb import OdbStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("deploy", help="hot-deploy .py service modules or .toml definitions")
    p.add_argument("directory")
    p.add_argument("files", nargs="+")
    p.set_defaults(handler=run)


def make_deployer(config: ServerConfig) -> Deployer:
    """A deployer that validates in the environment the server recorded when it started,
    not this shell's: that is where workers resolve $ENV{...} and import modules."""
    environ = server_environment(config.run_dir)
    if environ is None:
        print(
            f"esb: warning: {config.directory} has not recorded its environment (never started?); "
            "validating in this shell's environment",
            file=sys.stderr,
        )
    return Deployer.for_server(
        config, OdbStore(config.odb_url), make_redis(config.redis_url, retries=1), environ=environ
    )


def run(args: argparse.Namespace) -> int:
    config = load_or_exit(args.directory)
    deployer = make_deployer(config)
    code = OK
    for name in args.files:
        try:
            print(deployer.deploy(Path(name)))
        except (DeployError, ConfigError) as exc:
            print(f"esb: rejected {exc}; nothing written, the previous version serves", file=sys.stderr)
            code = FAILURE
        except OdbUnavailable as exc:
            print(f"esb: {name} not deployed: {exc}", file=sys.stderr)
            code = FAILURE
    return code
