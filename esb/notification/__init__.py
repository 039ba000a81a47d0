"""SQL notifications: a query run every ``interval_s`` whose new rows go to a service.

A notification is a duty the scheduler fires like a job (``as_job``): its lease, misfire
policy and no-overlap rule make one run at a time in the whole cluster, and a firing that
a killed worker held is reclaimed by another worker. The worker that takes the firing
(service ``NOTIFICATION_SERVICE``, reserved) runs it with ``esb.notification.runner``.
"""

from __future__ import annotations

from esb.config.definitions import Definitions, JobDef, SqlNotificationDef

NOTIFICATION_SERVICE = "esb.notification.run"
JOB_PREFIX = "esb.notification:"


def job_name(notification: str) -> str:
    """The name of the scheduler job that fires NOTIFICATION."""
    return JOB_PREFIX + notification


def as_job(definition: SqlNotificationDef) -> JobDef:
    """The job the scheduler places for DEFINITION: every interval_s, no overlap, a pile of
    missed firings folded into one run."""
    return JobDef(
        name=job_name(definition.name),
        service=NOTIFICATION_SERVICE,
        type="interval",
        seconds=definition.interval_s,
        payload={"notification": definition.name},
        coalesce=True,
        on_overlap="skip",
        paused=not definition.is_active,
    )


def notification_jobs(definitions: Definitions) -> dict[str, JobDef]:
    """The scheduler's jobs for every notification DEFINITIONS hold."""
    jobs = (as_job(note) for note in definitions.of("notification.sql").values())
    return {job.name: job for job in jobs}


__all__ = ["JOB_PREFIX", "NOTIFICATION_SERVICE", "as_job", "job_name", "notification_jobs"]
