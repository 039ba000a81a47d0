"""Metrics counted in memory and handed to prometheus_client's multiprocess mode.

prometheus_client chooses its mode when it is first imported, so each "worker" here is a
fresh Python process with PROMETHEUS_MULTIPROC_DIR set, as a gunicorn worker has it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from esb.observe import metrics

# One worker's life: requests on two channels, services, one error, dispatched runs and
# their delays, a flush; then it prints its pid.
WORKER = """
import os
from esb.observe import metrics

def app(environ, start_response):
    if environ["PATH_INFO"] != "/none":
        environ[metrics.CHANNEL_KEY] = environ["PATH_INFO"].strip("/")
    return [b"{}"]

counted = metrics.counting(app)
for path in ["/a", "/a", "/b", "/none"]:
    counted({"PATH_INFO": path}, None)
metrics.observe_service("s.fast", 0.0002)
metrics.observe_service("s.fast", 0.001)  # on a bound: counts in that bucket
metrics.observe_service("s.slow", 99.0)   # past the last bound: +Inf only
metrics.http_errors[404] += 1
metrics.dispatch_runs["ok"] += 2
metrics.observe_dispatch_delay(0.004)
metrics.observe_firing_delay(0.02)
publisher = metrics.Publisher()
publisher.flush()
publisher.flush()  # nothing new: adds nothing
print(os.getpid())
"""

RENDER = """
import sys
from esb.observe import metrics
for pid in sys.argv[1:]:
    metrics.process_dead(int(pid))
sys.stdout.write(metrics.render().decode())
"""


def run(code: str, directory: Path, *args: str) -> str:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_counts_of_every_worker_add_up_and_stay_after_it_dies(tmp_path):
    directory = metrics.empty_directory(tmp_path)
    first = run(WORKER, directory).strip()
    run(WORKER, directory)
    both = samples(run(RENDER, directory))
    assert both['esb_http_requests_total{channel="a"}'] == 4
    assert both['esb_http_requests_total{channel="b"}'] == 2
    assert not any('channel="none"' in name for name in both)
    assert both['esb_http_errors_total{status="404"}'] == 2
    assert both['esb_dispatch_runs_total{outcome="ok"}'] == 4
    assert both["esb_workers"] == 2
    assert both['esb_http_request_duration_seconds_count{channel="a"}'] == 4
    assert both['esb_http_request_duration_seconds_bucket{channel="a",le="+Inf"}'] == 4
    service = 'esb_service_duration_seconds_bucket{le="%s",service="s.%s"}'
    assert both[service % ("0.0005", "fast")] == 2
    assert both[service % ("0.001", "fast")] == 4
    assert both[service % ("10.0", "slow")] == 0
    assert both[service % ("+Inf", "slow")] == 2
    assert both['esb_service_duration_seconds_sum{service="s.slow"}'] == 198.0
    assert both['esb_dispatch_delay_seconds_bucket{le="0.0025"}'] == 0
    assert both['esb_dispatch_delay_seconds_bucket{le="0.005"}'] == 2
    assert both['esb_job_firing_delay_seconds_bucket{le="0.025"}'] == 2
    assert both["esb_job_firing_delay_seconds_count"] == 2

    # The arbiter marks the first worker dead: the live gauge drops, every total stays.
    after = samples(run(RENDER, directory, first))
    assert after["esb_workers"] == 1
    assert {k: v for k, v in after.items() if k != "esb_workers"} == {
        k: v for k, v in both.items() if k != "esb_workers"
    }


REFUSED = """
from esb.observe import metrics
try:
    metrics.Publisher()
except RuntimeError:
    print("refused")
"""


def test_without_the_directory_the_publisher_refuses():
    code = REFUSED
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "refused", done.stderr
