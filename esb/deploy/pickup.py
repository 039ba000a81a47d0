"""The pickup watcher: the one process per server that deploys files dropped into pickup/."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

from esb.bus import Keys, make_redis
from esb.config import load_server_config
from esb.deploy.deployer import Deployer
from esb.errors import ConfigError, DeployError, OdbUnavailable
from esb.observe import setup_logging
from esb.odb import OdbStore

logger = logging.getLogger(__name__)

POLL_S = 0.5
# A file still being written changes; wait until it has been quiet this long.
SETTLE_S = 0.3


class PickupWatcher:
    def __init__(self, directory: Path, deployer: Deployer):
        self.directory = directory
        self.deployer = deployer
        self._stopping = False

    def handle_sigterm(self, signum: int, frame: object) -> None:
        self._stopping = True

    def ready_files(self) -> list[Path]:
        now = time.time()
        files = []
        for path in sorted(self.directory.iterdir()):
            if path.suffix not in (".py", ".toml") or not path.is_file():
                continue
            try:
                if now - path.stat().st_mtime >= SETTLE_S:
                    files.append(path)
            except FileNotFoundError:
                continue
        return files

    def handle(self, path: Path) -> None:
        try:
            outcome = self.deployer.deploy(path)
            logger.info("pickup: %s", outcome)
        except (DeployError, ConfigError) as exc:
            logger.error("pickup: %s rejected: %s; the previous version keeps serving", path.name, exc)
        except OdbUnavailable as exc:
            logger.warning("pickup: %s waits, the ODB is unavailable (%s)", path.name, exc)
            return  # keep the file; try again on the next pass
        path.unlink(missing_ok=True)

    def run_forever(self) -> None:
        logger.info("pickup: watching %s", self.directory)
        while not self._stopping:
            for path in self.ready_files():
                self.handle(path)
            time.sleep(POLL_S)
        logger.info("pickup: stopped")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = load_server_config(argv[0])
    setup_logging(config.log_dir / "server.log", level=config.logging.level, as_json=config.logging.json)
    config.pickup_dir.mkdir(exist_ok=True)
    deployer = Deployer(OdbStore(config.odb_url), make_redis(config.redis_url), Keys(config.main.cluster))
    watcher = PickupWatcher(config.pickup_dir, deployer)
    signal.signal(signal.SIGTERM, watcher.handle_sigterm)
    signal.signal(signal.SIGINT, watcher.handle_sigterm)
    watcher.run_forever()


if __name__ == "__main__":
    main()
