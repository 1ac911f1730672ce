"""A tenant's submission limits as the job store checks them: the in-flight cap and the rate.

:mod:`api.limits` owns their meaning (windows, Retry-After) and builds a :class:`Quota`; the store
checks it — and, for a submission, records the job — in one atomic step
(:meth:`~broker.jobstore.base.JobStore.create_and_enqueue_within`). The sliding-window test is written
once per language: ``lua/quota.lua`` on Redis, :func:`over_rate` here for every other store.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.jobstore.base import JobStore
    from broker.schema import Job


@dataclasses.dataclass(frozen=True)
class Quota:
    """A tenant's submission limits for one check.

    Refused when the tenant's active set holds ``max_in_flight`` jobs or more (0: off), or, when
    ``check_rate``, when :func:`over_rate` holds for the two counters ``rate_keys`` (this window's,
    the previous one's; ``rate_limit`` 0: off). An admitted check with ``count`` increments this
    window's counter (which expires ``counter_ttl_s`` after its last increment).
    """

    max_in_flight: int = 0
    rate_limit: int = 0
    rate_keys: tuple[str, str] | None = None
    previous_weight: float = 0.0
    counter_ttl_s: int = 0
    check_rate: bool = True
    count: bool = True


NO_QUOTA = Quota()


@dataclasses.dataclass(frozen=True)
class QuotaAnswer:
    """What a quota check did: ``refused`` is None (admitted; created at ``position`` when it was a
    create, None: not queued), ``"in_flight"`` or ``"rate"`` (nothing written, nothing counted).

    ``active`` is the tenant's queued and running jobs (a created job included; -1: not read, the cap
    is off); ``previous`` and ``current`` the rate counters (``current`` after counting; 0 when the
    rate is off).
    """

    refused: str | None
    position: int | None = None
    active: int = -1
    previous: int = 0
    current: int = 0


def over_rate(previous: int, current: int, previous_weight: float, limit: int) -> bool:
    """Whether one more submission would exceed ``limit``: the sliding window's estimate of the last
    window (``previous`` weighted by the share of it still inside, plus ``current``) leaves no room."""
    return previous * previous_weight + current > limit - 1


class LocalQuota:
    """:class:`Quota` for a store without an atomic script of its own: the counters in process memory,
    checks and create under one lock (atomic within this process only: unit tests, fakes)."""

    # forget expired counters once this many are held
    _PRUNE_AT = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, tuple[int, float]] = {}  # key → (count, expires at, monotonic s)

    def _read(self, key: str) -> int:
        count, expires_at = self._counters.get(key, (0, 0.0))
        return count if time.monotonic() < expires_at else 0

    def _increment(self, key: str, ttl_s: int) -> int:
        now = time.monotonic()
        if len(self._counters) >= self._PRUNE_AT:
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        count = self._read(key) + 1
        self._counters[key] = (count, now + ttl_s)
        return count

    def _apply(self, store: JobStore, tenant: str, quota: Quota) -> QuotaAnswer:
        active = -1
        if quota.max_in_flight:
            active = store.tenant_active_count(tenant)
            if active >= quota.max_in_flight:
                return QuotaAnswer("in_flight", active=active)
        previous = current = 0
        if quota.rate_limit and quota.rate_keys is not None:
            now_key, previous_key = quota.rate_keys
            current, previous = self._read(now_key), self._read(previous_key)
            if quota.check_rate and over_rate(previous, current, quota.previous_weight, quota.rate_limit):
                return QuotaAnswer("rate", None, active, previous, current)
            if quota.count:
                current = self._increment(now_key, quota.counter_ttl_s)
        return QuotaAnswer(None, None, active, previous, current)

    def check(self, store: JobStore, tenant: str, quota: Quota) -> QuotaAnswer:
        """``quota`` for ``tenant`` against ``store``'s active jobs, without a create.

        Raises:
            Exception: what ``store.tenant_active_count`` raises.
        """
        with self._lock:
            return self._apply(store, tenant, quota)

    def create(self, store: JobStore, job: Job, queue: str, message: str, quota: Quota) -> QuotaAnswer:
        """``store.create_and_enqueue(job, queue, message)`` if ``quota`` admits it.

        Raises:
            KeyError: the job id is taken (nothing counted, nothing written).
        """
        with self._lock:
            if store.get(job.id) is not None:
                raise KeyError(f"job {job.id} already exists")
            answer = self._apply(store, job.tenant, quota)
            if answer.refused is not None:
                return answer
            position = store.create_and_enqueue(job, queue, message)
            active = answer.active + 1 if quota.max_in_flight else answer.active
            return dataclasses.replace(answer, position=position, active=active)
