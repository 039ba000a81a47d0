"""Every Redis key and channel esb uses, built in one place under one prefix per cluster.

One order everywhere: ``esb:<cluster>:<subsystem>:...``, so that a subsystem's keys sit
together in ``SCAN`` and ``redis-cli --bigkeys``, and a pattern per subsystem is a prefix.
"""

from __future__ import annotations

# The longest any per-message state may outlive its message in Redis, in seconds: what
# at-least-once needs to recognise a redelivery of a message that finished (an
# acknowledgement lost with its connection arrives again within it), and no more, so that
# such state is bounded by the message rate (rate x this), not by the history. The
# dispatch stream needs none of it: a finished entry is acknowledged and deleted at once.
FINISHED_MESSAGE_TTL_S = 60


class Keys:
    """Key names for one cluster: ``esb:<cluster>:...``. Tests pick a unique cluster name."""

    def __init__(self, cluster: str):
        self.prefix = f"esb:{cluster}:"
        # The stream every worker consumes: invoke_async messages and scheduler firings.
        self.dispatch = self.prefix + "dispatch"
        self.dispatch_group = "workers"
        # Pub/sub channel announcing a new ODB generation (hot deploy, definitions).
        self.deploy_channel = self.prefix + "deploy"
        self.scheduler_lease = self.prefix + "scheduler:lease"
        # Manual "run this job now" requests for the active scheduler.
        self.scheduler_commands = self.prefix + "scheduler:commands"

    def scheduler_reply(self, request_id: str) -> str:
        """The active scheduler's answer to one manual request on ``scheduler_commands``."""
        return f"{self.prefix}scheduler:reply:{request_id}"

    def scheduler_heartbeat(self, host: str, pid: int) -> str:
        return f"{self.prefix}scheduler:hb:{host}:{pid}"

    @property
    def scheduler_heartbeat_pattern(self) -> str:
        return f"{self.prefix}scheduler:hb:*"

    def worker_heartbeat(self, host: str, pid: int) -> str:
        return f"{self.prefix}worker:hb:{host}:{pid}"

    @property
    def worker_heartbeat_pattern(self) -> str:
        return f"{self.prefix}worker:hb:*"

    def job_state(self, job: str) -> str:
        """Hash of a job's schedule and run record; its owner is ``esb.bus.jobstate``."""
        return f"{self.prefix}job:{job}"

    def job_inflight(self, job: str) -> str:
        """The firing id of a job's run in progress; absent when none runs."""
        return f"{self.prefix}job:{job}:inflight"

    # -- dispatch: liveness of consumers, dead letters, worker deaths ------------------

    def consumer_alive(self, consumer: str) -> str:
        """Present while the dispatch consumer CONSUMER's process lives; set with a short TTL
        by a native thread of that worker, so only a dead or stopped worker loses it."""
        return f"{self.prefix}dispatch:alive:{consumer}"

    @property
    def dead_letters(self) -> str:
        """The stream of dispatch messages given up on after ``max_deliveries``."""
        return f"{self.prefix}dispatch:dead"

    @property
    def worker_deaths(self) -> str:
        """Sorted set of workers that died without being asked to (``host:pid``, score: when)."""
        return f"{self.prefix}worker:deaths"

    # -- AMQP channels ---------------------------------------------------------------------

    def amqp_deliveries(self, channel: str, message_key: str) -> str:
        """Hash counting the deliveries of one redelivered message of a channel; its owner
        is ``esb.outgoing.amqp.deliveries``, and it expires a minute after the message settled."""
        return f"{self.prefix}amqp:deliveries:{channel}:{message_key}"
