"""The launcher (``esb start --fg``, which lives as long as the server) imports neither the
web stack nor the scheduler's, nor the deploy stack it hands to ``esb.deploy.apply``
processes: what it imports it holds for the server's whole life (memory an idle server keeps)."""

from __future__ import annotations

from tests.helpers import loaded_packages, modules_loaded_by

# What `python -m esb.cli start DIR --fg` imports before and while it runs the launcher.
PROBE = """
from esb.cli.main import build_parser
args = build_parser(["start", "/nowhere", "--fg"]).parse_args(["start", "/nowhere", "--fg"])
assert args.handler.__module__ == "esb.cli.start"
import esb.launcher, esb.launcher.supervisor, esb.launcher.children, esb.deploy.pickup
import esb.deploy.apply, esb.deploy.environment, esb.observe.metrics, esb.observe.supervision
watcher = esb.deploy.pickup.PickupWatcher(__import__("pathlib").Path("/nowhere"),
                                          esb.deploy.pickup.deploy_in_process(__import__("pathlib").Path("/x")))
"""

FORBIDDEN = {
    "falcon", "gunicorn", "gevent",  # the web stack: the arbiter's and workers'
    "apscheduler",  # the scheduler's
    "sqlalchemy", "redis", "kombu", "amqp",  # the deploy stack and the rest: apply processes
    # greenlet (and the C++ runtime it links) only for a worker's call tracking
    # (esb.observe.calls); hashlib loads OpenSSL's libcrypto: 1.1 and 3.6 MB of RSS.
    "greenlet", "hashlib", "_hashlib",
}


def test_the_launcher_imports_no_web_scheduler_or_deploy_stack():
    assert loaded_packages(modules_loaded_by(PROBE), FORBIDDEN) == set()


def test_from_esb_import_service_still_works_lazily():
    probe = ("import sys, esb; assert 'esb.service' not in sys.modules; "
             "from esb import Service, BadInput; "
             "assert (Service.__module__, BadInput.__module__) == ('esb.service.base', 'esb.errors')")
    modules_loaded_by(probe)
