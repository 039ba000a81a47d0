"""The launcher (``esb start --fg``, which lives as long as the server) imports neither the
web stack nor the scheduler's, nor the deploy stack it hands to ``esb.deploy.apply``
processes: what it imports it holds for the server's whole life (issue 12)."""

from __future__ import annotations

import subprocess
import sys

# What `python -m esb.cli start DIR --fg` imports before and while it runs the launcher.
PROBE = """
import sys
from esb.cli.main import build_parser
args = build_parser(["start", "/nowhere", "--fg"]).parse_args(["start", "/nowhere", "--fg"])
assert args.handler.__module__ == "esb.cli.start"
import esb.launcher, esb.launcher.supervisor, esb.launcher.children, esb.deploy.pickup
import esb.deploy.apply, esb.deploy.environment, esb.observe.metrics, esb.observe.supervision
watcher = esb.deploy.pickup.PickupWatcher(__import__("pathlib").Path("/nowhere"),
                                          esb.deploy.pickup.deploy_in_process(__import__("pathlib").Path("/x")))
print(sorted({m.split(".")[0] for m in sys.modules}))
"""

FORBIDDEN = {
    "falcon", "gunicorn", "gevent",  # the web stack: the arbiter's and workers'
    "apscheduler",  # the scheduler's
    "sqlalchemy", "redis", "kombu", "amqp",  # the deploy stack and the rest: apply processes
}


def test_the_launcher_imports_no_web_scheduler_or_deploy_stack():
    # A process of its own: this one may have loaded all of them for other tests.
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(eval(done.stdout.strip()))  # noqa: S307 - our own probe's printed list
    assert loaded & FORBIDDEN == set()


def test_from_esb_import_service_still_works_lazily():
    probe = ("import sys, esb; assert 'esb.service' not in sys.modules; "
             "from esb import Service, BadInput; print(Service.__module__, BadInput.__module__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["esb.service.base", "esb.errors"]
