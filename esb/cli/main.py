"""The `esb` command: one module per subcommand, each parses, calls a subsystem, maps errors
to exit codes (0 ok, 1 failure, 2 bad configuration or usage).

Only the module of the command being run is imported: ``esb start --fg`` is the launcher,
which lives as long as the server, and must not hold the Redis, ODB and AMQP stacks that
``esb status`` or ``esb deploy`` need (``tests/unit/test_launcher_imports.py``); every
command also answers sooner.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# Name -> module, in the order `esb --help` lists them.
COMMANDS = {
    "quickstart": "esb.cli.quickstart",
    "start": "esb.cli.start",
    "stop": "esb.cli.stop",
    "status": "esb.cli.status",
    "jobs": "esb.cli.jobs",
    "notifications": "esb.cli.notifications",
    "deploy": "esb.cli.deploy",
    "undeploy": "esb.cli.undeploy",
    "invoke": "esb.cli.invoke",
    "check-config": "esb.cli.check_config",
    "dead-letters": "esb.cli.dead_letters",
}


def _config_example(args: argparse.Namespace) -> int:
    from esb.config import render_example

    sys.stdout.write(render_example())
    return 0


def _command_of(argv: list[str]) -> str | None:
    """The subcommand ARGV names, if it names one of COMMANDS."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; for ARGV naming a command, only that command's module is imported
    (the others get a bare entry, never parsed)."""
    parser = argparse.ArgumentParser(prog="esb", description="esb, the enterprise service bus")
    subparsers = parser.add_subparsers(dest="command", required=True)
    chosen = _command_of(sys.argv[1:] if argv is None else argv)
    for name, module in COMMANDS.items():
        if chosen is None or name == chosen:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name)
    example = subparsers.add_parser("config-example", help="print server.conf.example")
    example.set_defaults(handler=_config_example)
    return parser


# Files esb creates hold secrets (server.conf, the ODB, Redis's append-only file, logs with
# payloads): readable by their owner only. Every process of a server inherits this.
PRIVATE_UMASK = 0o077
# A command whose reader went away (``esb status DIR | head -1``) exits as a tool killed by
# SIGPIPE does, with no traceback: Python ignores SIGPIPE, so the write raises instead.
# (SIGPIPE is not restored to its default: the launcher and the workers write to sockets.)
PIPE_CLOSED = 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> None:
    os.umask(PRIVATE_UMASK)
    try:
        try:
            args = build_parser(argv).parse_args(argv)
            code = args.handler(args)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout once more at exit: that one must find somewhere to write.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = PIPE_CLOSED
    raise SystemExit(code)
