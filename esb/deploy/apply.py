"""``python -m esb.deploy.apply DIR (--config | --file NAME)``: one deploy in a process of its own.

The launcher runs it for the deploys it owns: ``--file NAME`` for each file the pickup
watcher takes (the file's text on stdin), and ``--config`` at a start that runs no
arbiter (``--only scheduler``, ``--only pickup``: create the ODB schema, store
``config/*.toml``; otherwise the arbiter does that, ``prepare_odb``). Why a process: the
deploy stack (SQLAlchemy, redis-py, the definitions' checks) costs the launcher about 35
MB and 0.3 s of imports that it would then hold for the server's whole life, to use a
few times; a process started when a deploy is due costs the same 0.3 s once and gives
its memory back. It runs with the launcher's environment, which is the workers' (the one
deploys are checked in).

It answers with JSON lines on stdout, one per outcome: ``{"outcome": "..."}`` for what
was stored, ``{"rejected": "..."}`` for a change refused (exit 1), ``{"wait": "..."}``
when the ODB cannot be reached (exit 75: try again later), ``{"error": "..."}`` for
anything else (exit 1). ``run_apply`` is the launcher's side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esb.config import ServerConfig

OK = 0
REJECTED = 1
TEMPORARY = 75  # EX_TEMPFAIL: the ODB is unavailable, the same change may pass later
PREPARED = "odb-prepared"


def prepared_marker(run_dir: Path) -> Path:
    """Written by the arbiter once it prepared the ODB (``prepare_odb``), before it forks
    its workers; the launcher starts the scheduler after it, and removes it at each start."""
    return run_dir / PREPARED


def prepare_odb(config: ServerConfig) -> list[str]:
    """Create the ODB schema, store ``config/*.toml`` (each unit unless unchanged) and check
    that every stored unit resolves in this environment; the outcomes. Raises ConfigError
    or DeployError for invalid definitions (a stored unit naming an unset variable among
    them), EsbError (among them OdbUnavailable) when it cannot be done.

    Run at each start, by the arbiter before it forks (it imports all this for its workers
    anyway), or by an apply process when this launcher runs no server (``--only``).
    """
    from esb.bus import Keys, make_redis
    from esb.deploy.deployer import Deployer
    from esb.deploy.stored import check_stored_units
    from esb.errors import ConfigError
    from esb.odb import OdbStore

    odb = OdbStore(config.odb_url)
    client = make_redis(config.redis_url, retries=1)
    try:
        odb.create_schema()
        deployer = Deployer(odb, client, Keys(config.main.cluster))
        outcomes = []
        for path in sorted(config.config_dir.glob("*.toml")):
            outcome = deployer.deploy_unit_text(path.name, path.read_text(encoding="utf-8"))
            if outcome is not None:
                outcomes.append(str(outcome))
        # A unit deployed earlier may name a variable this start's environment lacks: its
        # workers would serve without it. Refused here, before any worker forks.
        unresolved = check_stored_units(odb, str(config.directory))
        if unresolved:
            raise ConfigError("units stored in the ODB", None, " | ".join(unresolved))
        return outcomes
    finally:
        odb.dispose()
        client.close()


@dataclass(frozen=True)
class ApplyResult:
    """What one ``esb.deploy.apply`` process answered."""

    code: int
    outcomes: list[str]
    problem: str | None  # why it was rejected, must wait, or failed
    kind: str | None = None  # "rejected", "wait" or "error", as the process said

    @property
    def is_rejected(self) -> bool:
        """The change itself was refused (not: the deploy could not be done now)."""
        return self.kind == "rejected"

    @property
    def must_wait(self) -> bool:
        return self.code == TEMPORARY


def run_apply(directory: Path, args: list[str], *, stdin_text: str | None = None,
              timeout_s: float = 120.0) -> ApplyResult:
    """Run one apply process for the server in DIRECTORY and read its answer.

    -P: the launcher's working directory is not on the child's import path (a redis.py
    lying there must not be imported in place of the real one).
    """
    argv = [sys.executable, "-P", "-m", "esb.deploy.apply", str(directory), *args]
    try:
        done = subprocess.run(argv, input=stdin_text, capture_output=True, text=True,
                              timeout=timeout_s, close_fds=True)
    except subprocess.TimeoutExpired:
        return ApplyResult(1, [], f"the deploy process did not finish within {timeout_s:.0f} s", "error")
    outcomes, problem, kind = [], None, None
    for line in done.stdout.splitlines():
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if "outcome" in answer:
            outcomes.append(answer["outcome"])
        elif answer:
            kind, problem = next(iter(answer.items()))
    if done.returncode != OK and problem is None:
        tail = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-5:]
        kind, problem = "error", f"the deploy process exited {done.returncode}: " + " | ".join(tail)
    return ApplyResult(done.returncode, outcomes, problem, kind)


def _say(**answer: str) -> None:
    print(json.dumps(answer), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse ``DIR --config`` or ``DIR --file NAME``; deploy; answer in JSON lines."""
    import argparse

    from esb.bus import make_redis
    from esb.config import load_server_config
    from esb.deploy.deployer import Deployer
    from esb.errors import ConfigError, DeployError, EsbError, OdbUnavailable
    from esb.odb import OdbStore

    parser = argparse.ArgumentParser(prog="python -m esb.deploy.apply")
    parser.add_argument("directory")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", action="store_true", help="create the schema, store config/*.toml")
    what.add_argument("--file", help="deploy the text on stdin as a file of this name")
    args = parser.parse_args(argv)
    try:
        config = load_server_config(args.directory)
    except ConfigError as exc:
        _say(error=str(exc))
        return REJECTED
    odb = client = None
    try:
        if args.config:
            for outcome in prepare_odb(config):
                _say(outcome=outcome)
        else:
            odb = OdbStore(config.odb_url)
            client = make_redis(config.redis_url, retries=1)
            deployer = Deployer.for_server(config, odb, client)
            _say(outcome=str(deployer.deploy_text(args.file, sys.stdin.read())))
    except (ConfigError, DeployError) as exc:
        _say(rejected=str(exc))
        return REJECTED
    except OdbUnavailable as exc:
        _say(wait=str(exc))
        return TEMPORARY
    except EsbError as exc:
        _say(error=str(exc))
        return REJECTED
    finally:
        if odb is not None:
            odb.dispose()
        if client is not None:
            client.close()
    return OK


if __name__ == "__main__":
    sys.exit(main())
