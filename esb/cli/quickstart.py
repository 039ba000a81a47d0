"""`esb quickstart DIR`: a ready server directory with the demo services deployed."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import esb
from esb.cli.common import FAILURE, OK
from esb.config import load_server_config
from esb.config.server_conf import SERVER_CONF, write_server_conf
from esb.deploy import validate_module
from esb.errors import EsbError
from esb.odb import MODULE, OdbStore

DEMO_FILES = ("demo.py", "demo.toml")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="create a ready server directory")
    p.add_argument("directory")
    p.add_argument("--port", type=int, default=17010)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--redis", help="Redis URL; without it, the embedded Redis")
    p.add_argument("--odb", help="SQLAlchemy URL of the ODB; without it, SQLite in DIR")
    p.add_argument("--cluster", default="esb", help="cluster name, the prefix of Redis keys")
    p.add_argument("--timeout", type=int, default=30, help="seconds before a silent worker is killed")
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(handler=run)


def demo_services_dir() -> Path:
    """services/ of a checkout, else the copy installed under share/esb/services."""
    checkout = Path(esb.__file__).resolve().parent.parent / "services"
    if (checkout / "demo.py").exists():
        return checkout
    return Path(sys.prefix) / "share" / "esb" / "services"


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if directory.exists() and any(directory.iterdir()):
        print(f"esb: {directory} is not empty; quickstart only fills a new directory", file=sys.stderr)
        return FAILURE
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # it holds the ODB and server.conf: their secrets are the owner's
    for sub in ("config", "pickup", "logs", "run"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    settings = {
        "main": {
            "cluster": args.cluster,
            "host": args.host,
            "port": args.port,
            "workers": args.workers,
            "timeout_s": args.timeout,
        },
        "odb": {"url": args.odb or "sqlite:///odb.sqlite"},
        "redis": {"url": args.redis or "embedded"},
        "admin": {"username": "admin", "password": secrets.token_urlsafe(24)},
    }
    write_server_conf(directory / SERVER_CONF, settings)
    config = load_server_config(directory)
    demo = demo_services_dir()
    try:
        odb = OdbStore(config.odb_url)
        odb.create_schema()
        module = demo / "demo.py"
        validate_module(module)
        odb.put(MODULE, module.stem, module.read_text(encoding="utf-8"))
        odb.dispose()
    except (EsbError, OSError) as exc:
        print(f"esb: quickstart could not prepare the ODB: {exc}", file=sys.stderr)
        return FAILURE
    (directory / "config" / "demo.toml").write_text((demo / "demo.toml").read_text(encoding="utf-8"))
    print(f"created {directory.resolve()}")
    print(f"  start it:  esb start {directory}")
    print(f'  call it:   curl -s -X POST http://{args.host}:{args.port}/demo/hello -d \'{{"name": "esb"}}\'')
    print(f"  admin credential: [admin] in {directory / SERVER_CONF}")
    return OK
