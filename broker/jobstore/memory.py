"""The in-memory job store: the same semantics as the Redis one in a dict, for unit tests and fakes."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Mapping
from typing import Any

from broker.jobstore.base import Expect, JobStore
from broker.jobstore.claim import KeyClaim
from broker.jobstore.codec import decode_job, encode
from broker.jobstore.quota import Quota, QuotaAnswer
from broker.keys import LEGACY_MODEL
from broker.schema import PRIORITY_ORDER, Job, JobStatus, Priority, dump_fields, model_of, queue_deadline_at


class InMemoryJobStore(JobStore):
    """A thread-safe dict-backed store with the same semantics, for unit tests.

    ``pushed`` holds the ``(queue, message)`` pairs of :meth:`create_and_enqueue` and of
    transitions with ``push``, oldest first: the broker lists of this stand-in. The tenants' rate
    counters live here too (:class:`~broker.jobstore.quota.LocalQuota`), as they live beside the
    active sets on Redis.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, str]] = {}
        # reentrant: create_and_enqueue holds it around create (which subclasses may override)
        self._lock = threading.RLock()
        self.pushed: list[tuple[str, str]] = []

    def create(self, job: Job) -> None:
        with self._lock:
            if job.id in self._jobs:
                raise KeyError(f"job {job.id} already exists")
            self._jobs[job.id] = {k: encode(v) for k, v in dump_fields(job).items()}

    def create_and_enqueue(self, job: Job, queue: str, message: str) -> int | None:
        with self._lock:
            self.create(job)
            self.pushed.append((queue, message))
            return self.queue_position(job.id, job.params.model)

    # no I/O: the event loop runs these itself, no thread needed

    async def create_and_enqueue_async(self, job: Job, queue: str, message: str) -> int | None:
        return self.create_and_enqueue(job, queue, message)

    async def create_and_enqueue_within_async(self, job: Job, queue: str, message: str, quota: Quota, *,
                                              claim: KeyClaim | None = None) -> QuotaAnswer:
        return self.create_and_enqueue_within(job, queue, message, quota, claim=claim)

    async def check_quota_async(self, tenant: str, quota: Quota) -> QuotaAnswer:
        return self.check_quota(tenant, quota)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            raw = self._jobs.get(job_id)
            return decode_job(dict(raw)) if raw else None

    def compare_and_set(self, job_id: str, expect: Expect, fields: Mapping[str, Any]) -> bool:
        with self._lock:
            raw = self._jobs.get(job_id)
            if raw is None:
                return False
            for name, values in expect.items():
                if raw.get(name, "null") not in {encode(v) for v in values}:
                    return False
            raw.update({k: encode(v) for k, v in fields.items()})
            return True

    def _push_lock(self) -> contextlib.AbstractContextManager[Any]:
        return self._lock

    def _push(self, queue: str, message: str) -> None:
        self.pushed.append((queue, message))

    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        with self._lock:
            jobs = [(json.loads(r["created_at"]), i) for i, r in self._jobs.items()
                    if json.loads(r["tenant"]) == tenant]
        jobs.sort(reverse=True)
        return [i for _, i in jobs[offset:offset + limit]]

    def _all(self) -> list[Job]:
        with self._lock:
            raws = [dict(r) for r in self._jobs.values()]
        return [decode_job(r) for r in raws]

    def _queue(self, model: str | None = "*") -> list[Job]:
        """Queued jobs of ``model`` (None: the legacy model; "*": every model) in render order."""
        rank = {p: i for i, p in enumerate(PRIORITY_ORDER)}
        want = model or LEGACY_MODEL
        queued = [j for j in self._all() if j.status is JobStatus.QUEUED and want in ("*", model_of(j))]
        return sorted(queued, key=lambda j: (rank[j.params.priority], j.created_at))

    def queue_position(self, job_id: str, model: str | None = None) -> int | None:
        ids = [j.id for j in self._queue(model)]
        return ids.index(job_id) if job_id in ids else None

    def queued_count(self, priority: Priority, model: str | None = None) -> int:
        return sum(1 for j in self._queue(model) if j.params.priority is priority)

    def running_count(self, model: str | None = None) -> int:
        want = model or LEGACY_MODEL
        return sum(1 for j in self._all() if j.status is JobStatus.RUNNING and model_of(j) == want)

    def tenant_active_count(self, tenant: str) -> int:
        return sum(1 for j in self._all() if j.tenant == tenant and not j.status.is_terminal)

    def lapsed_leases(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        rows = [(j.id, j.lease_until or 0.0) for j in self._all() if j.status is JobStatus.RUNNING]
        return sorted((r for r in rows if r[1] < now), key=lambda r: r[1])[:limit]

    def overdue_queued(self, now: float, limit: int = 100) -> list[str]:
        rows = [(queue_deadline_at(j), j.id) for j in self._queue()]
        return [i for d, i in sorted((d, i) for d, i in rows if d is not None and d < now)][:limit]
