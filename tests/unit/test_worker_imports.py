"""A worker neither imports APScheduler nor the scheduler package: the scheduler is a
process of its own, and a worker reads job definitions without building triggers."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import esb.server.application, esb.server.consumer, esb.server.hooks, esb.server.worker
from esb.config import merge_units

unit = '[[scheduler.job]]\\nname = "n"\\nservice = "s"\\ntype = "cron"\\ncron = "0 3 * * 1-5"\\n'
assert merge_units([("jobs.toml", unit)], check_triggers=False).jobs["n"].cron == "0 3 * * 1-5"
print(sorted(m for m in sys.modules if m.split(".")[0] == "apscheduler" or m.startswith("esb.scheduler")))
"""


def test_worker_modules_load_neither_apscheduler_nor_the_scheduler():
    # A process of its own: this one may have loaded both for other tests.
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
