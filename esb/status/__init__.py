"""The health of a cluster, from the facts its components leave in Redis and in run/.

One layer above the parts it reads (bus, config, observe), so that ``esb status``,
``GET /esb/status`` and ``esb jobs`` all say the same thing.
"""

from esb.status.collect import collect_status, job_rows

__all__ = ["collect_status", "job_rows"]
