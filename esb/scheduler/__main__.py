"""``python -m esb.scheduler DIR``: run one scheduler in the foreground until SIGTERM/SIGINT.

Exit codes: 0 after a signal, 2 when server.conf is invalid.
"""

from __future__ import annotations

from esb.imports import defer_redis_asyncio

defer_redis_asyncio()  # before anything imports redis

import logging  # noqa: E402
import sys  # noqa: E402

from esb.config import load_server_config  # noqa: E402
from esb.errors import ConfigError  # noqa: E402
from esb.observe import setup_logging  # noqa: E402

logger = logging.getLogger("esb.scheduler")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m esb.scheduler DIR", file=sys.stderr)
        return 2
    try:
        config = load_server_config(argv[0])
    except ConfigError as exc:
        print(f"esb scheduler: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_dir / "scheduler.log", level=config.logging.level,
                  as_json=config.logging.json)
    # Imported after logging is set up, so import-time problems land in scheduler.log.
    from esb.scheduler.process import SchedulerProcess

    try:
        SchedulerProcess(config).run()
    except Exception:
        logger.exception("scheduler crashed; the launcher starts it again")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
