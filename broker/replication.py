"""Writes that must reach replicas before they count: Redis ``WAIT`` after a job store script.

Redis replication is asynchronous: a primary acknowledges a write before any replica has it, and a
failover to a replica that never got it drops the write. With ``min_replicas > 0`` the job store
sends ``WAIT min_replicas wait_timeout_ms`` on the same connection right after a create or a
terminal transition, in the same round trip (a pipeline without MULTI), and compares the count it
answers. ``min_replicas == 0`` (one Redis, today's default) sends no ``WAIT`` at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _ignore(what: str, acked: int) -> None:
    return None


@dataclass(frozen=True, kw_only=True)
class ReplicaPolicy:
    """How many replicas must hold a write before the store reports it done.

    ``on_shortfall(what, acked)`` is told of every ``WAIT`` answered by fewer replicas (``what``:
    ``"create"``, ``"transition"`` or ``"confirm"``), for a metric.
    """

    min_replicas: int = 0
    wait_timeout_ms: int = 1000
    on_shortfall: Callable[[str, int], None] = _ignore

    @property
    def waits(self) -> bool:
        """Whether any ``WAIT`` is sent."""
        return self.min_replicas > 0

    def wait_args(self) -> tuple[str, int, int]:
        """The ``WAIT`` command, as ``execute_command`` arguments."""
        return ("WAIT", self.min_replicas, self.wait_timeout_ms)


NO_WAIT = ReplicaPolicy()


class ReplicaShortfall(Exception):
    """Fewer replicas than required acknowledged a write within the timeout.

    ``kept``: the write stays on the primary (a created job a worker had already taken, or a
    replay's job); False: the store undid it (a created job withdrawn before any worker saw it).
    Not a ``RedisError``: callers decide what it means (the API answers 503 ``store_unavailable``).
    """

    def __init__(self, what: str, *, acked: int, wanted: int, job_id: str, kept: bool) -> None:
        super().__init__(f"{what} of {job_id}: {acked} of {wanted} replica(s) acknowledged")
        self.what, self.acked, self.wanted, self.job_id, self.kept = what, acked, wanted, job_id, kept
