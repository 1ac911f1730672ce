"""The job store's interface: the one source of truth about jobs.

Every change of a job is a compare-and-set: it happens only if the job's current fields match what
the caller expects (for example ``status`` is ``queued``), so two workers can never both start a job
and a finished job can never go back to running. Backends: :mod:`broker.jobstore.redis` (Lua
scripts) and :mod:`broker.jobstore.memory` (the stand-in for unit tests).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from broker.jobstore.claim import KeyClaim
from broker.jobstore.quota import LocalQuota, Quota, QuotaAnswer
from broker.schema import Job, JobStatus, Priority, sources_of

Expect = Mapping[str, Iterable[Any]]
"""field name → the values it may have for the change to apply."""


class JobStore(abc.ABC):
    """Base of all job stores."""

    @abc.abstractmethod
    def create(self, job: Job) -> None:
        """Save a new job.

        Raises:
            KeyError: the id is taken.
        """

    @abc.abstractmethod
    def create_and_enqueue(self, job: Job, queue: str, message: str) -> int | None:
        """Save a new queued job and push its broker ``message`` onto the list ``queue``, atomically:
        both or neither (a job never exists without its message). Returns the job's queue position
        (see :meth:`queue_position`).

        Raises:
            KeyError: the id is taken (nothing is pushed).
        """

    async def create_and_enqueue_async(self, job: Job, queue: str, message: str) -> int | None:
        """:meth:`create_and_enqueue` for the event loop (this default runs it in a thread)."""
        return await asyncio.to_thread(self.create_and_enqueue, job, queue, message)

    def create_and_enqueue_within(self, job: Job, queue: str, message: str, quota: Quota, *,
                                  claim: KeyClaim | None = None) -> QuotaAnswer:
        """:meth:`create_and_enqueue` if the tenant's ``quota`` admits it, checked (and counted) in the
        same atomic step: refused, nothing is written or counted. ``claim``: an Idempotency-Key to
        point at the job in the same step (:mod:`broker.jobstore.claim`); only a store that holds
        the keys (Redis) takes one.

        This default is atomic within one process (:class:`~broker.jobstore.quota.LocalQuota`, its
        counters in process memory); the Redis store does it in its create script.

        Raises:
            KeyError: the id is taken (nothing is written or counted).
            ValueError: a ``claim`` given to a store that does not hold the keys.
        """
        if claim is not None:
            raise ValueError(f"{type(self).__name__} does not hold Idempotency-Keys")
        return self._local_quota().create(self, job, queue, message, quota)

    async def create_and_enqueue_within_async(self, job: Job, queue: str, message: str, quota: Quota, *,
                                              claim: KeyClaim | None = None) -> QuotaAnswer:
        """:meth:`create_and_enqueue_within` for the event loop (this default runs it in a thread)."""
        return await asyncio.to_thread(self.create_and_enqueue_within, job, queue, message, quota, claim=claim)

    def check_quota(self, tenant: str, quota: Quota) -> QuotaAnswer:
        """``tenant``'s ``quota`` without a create: checked and, when admitted and ``quota.count``,
        counted (``position`` is None). Atomic as :meth:`create_and_enqueue_within`."""
        return self._local_quota().check(self, tenant, quota)

    async def check_quota_async(self, tenant: str, quota: Quota) -> QuotaAnswer:
        """:meth:`check_quota` for the event loop (this default runs it in a thread)."""
        return await asyncio.to_thread(self.check_quota, tenant, quota)

    def confirm_replicated(self, job_id: str) -> None:
        """Return once the store's replicas hold what it holds now (``job_id`` names the job this
        is for). This default has no replicas: it returns at once.

        Raises:
            broker.replication.ReplicaShortfall: too few replicas acknowledged in time.
        """
        return None

    def _local_quota(self) -> LocalQuota:
        # made on first use (subclasses need not call an __init__ here); dict.setdefault is atomic
        found: LocalQuota | None = self.__dict__.get("_quota_state")
        if found is None:
            found = self.__dict__.setdefault("_quota_state", LocalQuota())
        return found

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown."""

    @abc.abstractmethod
    def compare_and_set(self, job_id: str, expect: Expect, fields: Mapping[str, Any]) -> bool:
        """Set ``fields`` if every field in ``expect`` has one of its listed values.

        Returns False (and changes nothing) if the job is unknown or a check fails.
        """

    @abc.abstractmethod
    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        """A tenant's job ids, newest first."""

    @abc.abstractmethod
    def queue_position(self, job_id: str, model: str | None = None) -> int | None:
        """0-based place of a queued job in its model's (``model``, None: the legacy model) strict-priority
        render order; None if not queued."""

    @abc.abstractmethod
    def queued_count(self, priority: Priority, model: str | None = None) -> int:
        """Jobs of ``model`` (None: the legacy model) queued at ``priority``."""

    @abc.abstractmethod
    def running_count(self, model: str | None = None) -> int:
        """Jobs of ``model`` (None: the legacy model) running now."""

    @abc.abstractmethod
    def tenant_active_count(self, tenant: str) -> int:
        """A tenant's jobs queued or running now (the in-flight cap)."""

    @abc.abstractmethod
    def lapsed_leases(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Running jobs whose lease ended before ``now`` (epoch s), as (job id, lease_until)."""

    @abc.abstractmethod
    def overdue_queued(self, now: float, limit: int = 100) -> list[str]:
        """Queued jobs whose queue deadline passed before ``now`` (epoch s)."""

    def tenant_job_ids_before(
        self, tenant: str, before: tuple[float, str] | None, limit: int = 50,
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` of a tenant's jobs as ``(job id, created_at)``, newest first, starting
        strictly after the position ``before = (created_at, job id)`` in that order (None: the newest).

        A cursor that stays valid while new jobs arrive. This default reads every
        job; stores override it.
        """
        rows: list[tuple[str, float]] = []
        offset = 0
        while True:
            ids = self.tenant_job_ids(tenant, offset, 200)
            if not ids:
                break
            offset += len(ids)
            for job_id in ids:
                job = self.get(job_id)
                if job is not None and (before is None or (job.created_at, job_id) < before):
                    rows.append((job_id, job.created_at))
        rows.sort(key=lambda r: (r[1], r[0]), reverse=True)
        return rows[:limit]

    def get_for_tenant(self, job_id: str, tenant: str) -> Job | None:
        """The job if it exists and belongs to ``tenant``; otherwise None (never reveal others' jobs)."""
        job = self.get(job_id)
        return job if job is not None and job.tenant == tenant else None

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        fields: Mapping[str, Any] | None = None,
        *,
        from_: Iterable[JobStatus] | None = None,
        expect: Expect | None = None,
        push: tuple[str, str] | None = None,
    ) -> Job | None:
        """Move a job to ``to`` atomically; returns the new job, or None if the move was not legal now.

        ``from_`` narrows the legal source statuses; ``expect`` adds other checks
        (for example that ``worker`` is still the caller). ``push``: a ``(list, message)`` to LPUSH
        in the same atomic step, only if the move happens (a Celery message that must go with it).

        Raises:
            NotImplementedError: ``push`` given to a store that cannot push messages.
        """
        checks, changes = transition_checks(to, fields, from_, expect)
        with self._push_lock():
            if not self.compare_and_set(job_id, checks, changes):
                return None
            if push is not None:
                self._push(*push)
        return self.get(job_id)

    def _push_lock(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _push(self, queue: str, message: str) -> None:
        raise NotImplementedError("this store cannot push messages")


def transition_checks(to: JobStatus, fields: Mapping[str, Any] | None, from_: Iterable[JobStatus] | None,
                      expect: Expect | None) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """A transition's compare-and-set: the legal source statuses and ``expect``; the fields to set."""
    sources = set(sources_of(to)) if from_ is None else set(from_) & sources_of(to)
    checks: dict[str, list[Any]] = {"status": [s.value for s in sources]}
    for name, values in (expect or {}).items():
        checks[name] = list(values)
    return checks, {"status": to.value, **(fields or {})}
