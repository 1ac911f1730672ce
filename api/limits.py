"""Per-tenant limits on ``POST /v1/jobs`` and the cheap input checks that run before any image work.

* **Rate limit** (``EDITFARM_RATE_LIMIT_PER_MIN``, 0 = off): a sliding-window counter. Each tenant has
  one Redis counter per fixed 60 s window (``keys.rate_window``); a submission is allowed while
  ``previous window × (the share of it still inside the last 60 s) + current window`` stays below
  the limit, so a burst cannot double up at a window edge. Check-and-count is one Lua script
  (atomic across API replicas); refused requests are not counted. Over the limit → 429
  ``rate_limited`` with ``Retry-After`` (seconds until one more submission fits).
* **Jobs in flight** (``EDITFARM_MAX_JOBS_IN_FLIGHT``, 0 = off): the tenant's queued + running jobs
  (:meth:`broker.jobstore.JobStore.tenant_active_count`) → 429 ``too_many_jobs`` with ``Retry-After``.

Where they are checked: the authoritative check is part of the job's creation
(:meth:`broker.jobstore.JobStore.create_and_enqueue_within`: this module builds the
:class:`~broker.jobstore.Quota`, the store checks it). On Redis the create-and-enqueue script checks both
limits, counts the submission and writes the job, its message and its queue position in one atomic
step, so concurrent submissions cannot overshoot the in-flight cap, and an accepted submission costs
one Redis round trip. A refusal there writes nothing (the input images an edit already stored are
deleted) and answers the same 429s.

Bodies of a tenant at or near its limits are never parsed: each API process remembers, per tenant,
the headroom under both limits that the last answer reported (:class:`LimitsMemory`). While that
answer is fresh (:data:`FRESH_S`) and leaves at least a margin (a tenth of the limit, at least
:data:`MIN_MARGIN`), the body is read at once; otherwise (a new or stale tenant, or one near or over a
limit) both limits are checked, and the submission counted, before the body is read, after
authentication (:meth:`RateLimiter.admit_async`, one Lua script). Every ``POST /v1/jobs`` admitted by
the in-flight cap counts toward the rate exactly once, including refused (4xx) and idempotent-replayed
ones: counted before the body, or by the create, or, for a request that skipped the early check and
ended without a create, right after it (:meth:`RateLimiter.count_async`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Request

from api.errors import STORE_ERRORS, ApiError, ErrorResponse
from api.settings import ApiSettings
from broker import keys
from broker.jobstore import NO_QUOTA, InMemoryJobStore, JobStore, KeyClaim, Quota, QuotaAnswer, RedisJobStore
from broker.schema import ErrorCode, Job

logger = logging.getLogger("editfarm.api")

WINDOW_S = 60
# a full window is needed as "previous" during the next one
_COUNTER_TTL_S = 2 * WINDOW_S + 5
# Retry-After of too_many_jobs: no way to know when a job ends, so a polite constant
IN_FLIGHT_RETRY_AFTER_S = 15
# how long (monotonic seconds) a process trusts the headroom of a tenant's last answer
FRESH_S = 1.0
# the least headroom, under either limit, that lets a request skip the check before its body
MIN_MARGIN = 8


@dataclasses.dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: int = 0  # when refused: seconds until one more request fits (>= 1)
    room: float | None = None  # submissions that still fit now (after counting this one); None: unknown


@dataclasses.dataclass(frozen=True)
class Admission:
    """The submission limits' answer: allowed, or refused by the in-flight cap or by the rate.

    When allowed, ``rate_room`` and ``in_flight_room`` are the headroom left under each limit (this
    submission counted; None: that limit is off or its headroom unknown), for :class:`LimitsMemory`.
    """

    allowed: bool
    active: int | None = None  # refused by the in-flight cap: the tenant's jobs queued or running
    retry_after_s: int = 0  # refused by the rate: seconds until one more request fits (>= 1)
    rate_room: float | None = None
    in_flight_room: int | None = None


@dataclasses.dataclass(frozen=True)
class Created:
    """:meth:`RateLimiter.admit_and_create`'s answer: the admission and, when allowed, the job's queue
    position (None: not queued)."""

    admission: Admission
    position: int | None = None


def _window(now: float) -> tuple[int, float]:
    """(index of the fixed window holding ``now``, seconds elapsed in it)."""
    index = int(now // WINDOW_S)
    return index, now - index * WINDOW_S


def _room(previous: int, current: int, elapsed: float, limit: int) -> float:
    """How many more submissions fit the rate now (fractional: the previous window decays)."""
    return limit - (previous * (1.0 - elapsed / WINDOW_S) + current)


def retry_after_s(previous: int, current: int, elapsed: float, limit: int) -> int:
    """Whole seconds until one more submission fits (:func:`broker.jobstore.over_rate` no longer
    holds), assuming no other request is counted meanwhile."""
    room = limit - 1 - current
    if room >= 0 and previous > 0:
        # still this window: the previous window's weight must decay enough
        wait = WINDOW_S * (1.0 - room / previous) - elapsed
    else:
        # the next window, where this window's count becomes the decaying "previous"
        wait = WINDOW_S - elapsed + WINDOW_S * max(0.0, 1.0 - (limit - 1) / max(current, 1))
    return max(1, math.ceil(wait))


def _admission(answer: QuotaAnswer, max_in_flight: int, limit: int, elapsed: float, created: bool) -> Admission:
    """The store's quota answer as an Admission (``created``: ``answer.active`` counts this submission's job)."""
    if answer.refused == "in_flight":
        return Admission(False, active=answer.active)
    if answer.refused == "rate":
        return Admission(False, retry_after_s=retry_after_s(answer.previous, answer.current, elapsed, limit))
    in_flight_room = None
    if max_in_flight:
        in_flight_room = max_in_flight - answer.active - (0 if created else 1)
    return Admission(True, rate_room=_room(answer.previous, answer.current, elapsed, limit) if limit else None,
                     in_flight_room=in_flight_room)


class RateLimiter:
    """The submission limits' arithmetic: a tenant's limits and the clock become a
    :class:`~broker.jobstore.Quota` (this window's and the previous one's counter, the previous one's
    weight), which the job store checks and counts atomically — with the job's create when there is
    one (:meth:`~broker.jobstore.JobStore.create_and_enqueue_within`); its answer becomes an
    :class:`Admission` (headroom, Retry-After).

    The rate counters live in the job store, beside the tenants' active sets (Redis keys, or the
    in-memory store's memory). :meth:`hit` and :meth:`count` count in ``store``; give :meth:`admit`
    and :meth:`admit_and_create` that store too (on Redis: any store on the same server).
    Every method raises the store's errors (``redis.RedisError``, ``OSError``).
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store

    @staticmethod
    def _quota(tenant: str, max_in_flight: int, limit: int, now: float, *, check: bool = True,
               count: bool = True) -> tuple[Quota, float]:
        index, elapsed = _window(now)
        quota = Quota(max_in_flight=max_in_flight, rate_limit=limit,
                      rate_keys=(keys.rate_window(tenant, index), keys.rate_window(tenant, index - 1)),
                      previous_weight=1.0 - elapsed / WINDOW_S, counter_ttl_s=_COUNTER_TTL_S,
                      check_rate=check, count=count)
        return quota, elapsed

    def hit(self, tenant: str, limit: int, now: float, count: bool = True) -> RateDecision:
        """Count one submission if it fits within ``limit`` per minute (blocking). ``count=False`` only
        reads: allowed when one more would fit (its ``room`` counts nothing more)."""
        quota, elapsed = self._quota(tenant, 0, limit, now, count=count)
        answer = self.store.check_quota(tenant, quota)
        if answer.refused is not None:
            return RateDecision(False, retry_after_s(answer.previous, answer.current, elapsed, limit))
        return RateDecision(True, room=_room(answer.previous, answer.current, elapsed, limit))

    def count(self, tenant: str, now: float) -> None:
        """Count one submission toward the rate without checking it (blocking)."""
        quota, _ = self._quota(tenant, 0, 1, now, check=False)
        self.store.check_quota(tenant, quota)

    async def count_async(self, tenant: str, now: float) -> None:
        """:meth:`count` for the event loop."""
        quota, _ = self._quota(tenant, 0, 1, now, check=False)
        await self.store.check_quota_async(tenant, quota)

    def admit(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float) -> Admission:
        """The in-flight cap (``store``'s count of the tenant's active jobs; 0 = off), then the rate
        (0 = off), checked and the submission counted in one atomic step (blocking)."""
        quota, elapsed = self._quota(tenant, max_in_flight, limit, now)
        return _admission(store.check_quota(tenant, quota), max_in_flight, limit, elapsed, created=False)

    async def admit_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                          now: float) -> Admission:
        """:meth:`admit` for the event loop."""
        quota, elapsed = self._quota(tenant, max_in_flight, limit, now)
        answer = await store.check_quota_async(tenant, quota)
        return _admission(answer, max_in_flight, limit, elapsed, created=False)

    def admit_and_create(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float,
                         job: Job, queue: str, message: str, counted: bool, *,
                         claim: KeyClaim | None = None) -> Created:
        """The limits, then :meth:`JobStore.create_and_enqueue`, as one step: refused, nothing is
        created. ``counted``: this submission was counted toward the rate already (by :meth:`admit`),
        so only the in-flight cap is checked again (blocking). ``claim``: as
        :meth:`JobStore.create_and_enqueue_within`.

        Raises:
            KeyError: the job id is taken.
        """
        quota, elapsed = self._quota(tenant, max_in_flight, limit, now, check=not counted, count=not counted)
        answer = store.create_and_enqueue_within(job, queue, message, quota, claim=claim)
        return Created(_admission(answer, max_in_flight, limit, elapsed, created=True), answer.position)

    async def admit_and_create_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                                     now: float, job: Job, queue: str, message: str, counted: bool, *,
                                     claim: KeyClaim | None = None) -> Created:
        """:meth:`admit_and_create` for the event loop.

        Raises:
            KeyError: the job id is taken.
        """
        quota, elapsed = self._quota(tenant, max_in_flight, limit, now, check=not counted, count=not counted)
        answer = await store.create_and_enqueue_within_async(job, queue, message, quota, claim=claim)
        return Created(_admission(answer, max_in_flight, limit, elapsed, created=True), answer.position)


class RedisRateLimiter(RateLimiter):
    """The limiter on Redis (shared by every API replica): its counters beside the job store's active
    sets, so one script checks both limits (and creates the job). ``async_client`` runs the ``*_async``
    methods on the event loop, each call bounded by ``async_timeout_s`` (see
    :class:`~broker.jobstore.RedisJobStore` for why that client should have no ``socket_timeout``)."""

    def __init__(self, client: redis.Redis, async_client: aioredis.Redis | None = None,
                 async_timeout_s: float = 10.0) -> None:
        super().__init__(RedisJobStore(client, async_client, async_timeout_s))


class InMemoryRateLimiter(RateLimiter):
    """The limiter over an in-memory job store (unit tests, fake services): pass the services' store so
    that :meth:`hit` and :meth:`count` see what :meth:`admit` counted."""

    def __init__(self, store: InMemoryJobStore | None = None) -> None:
        super().__init__(store if store is not None else InMemoryJobStore())


class LimitsMemory:
    """Per API process: each tenant's headroom under its limits, as the last answer reported, so that
    a tenant far from both limits skips the check before its body (the create checks them anyway).

    Entries last :data:`FRESH_S`; each request that skips the early check takes one off both
    headrooms until the next answer replaces them. Bounded: cleared past ``max_tenants`` entries.
    """

    def __init__(self, max_tenants: int = 10_000) -> None:
        self._max_tenants = max_tenants
        self._entries: dict[str, tuple[float, float | None, int | None]] = {}

    @staticmethod
    def margin(limit: int) -> int:
        return max(MIN_MARGIN, limit // 10)

    def needs_check(self, tenant: str, max_in_flight: int, limit: int, now: float) -> bool:
        """Whether ``tenant``'s limits must be checked before its body (``now``: monotonic seconds)."""
        entry = self._entries.get(tenant)
        if entry is None or now - entry[0] > FRESH_S:
            return True
        at, rate_room, in_flight_room = entry
        if limit and (rate_room is None or rate_room < self.margin(limit)):
            return True
        if max_in_flight and (in_flight_room is None or in_flight_room < self.margin(max_in_flight)):
            return True
        self._entries[tenant] = (at, None if rate_room is None else rate_room - 1,
                                 None if in_flight_room is None else in_flight_room - 1)
        return False

    def remember(self, tenant: str, admission: Admission, now: float) -> None:
        """Keep an answer's headroom (a refusal: none, so the next request is checked early)."""
        if len(self._entries) >= self._max_tenants and tenant not in self._entries:
            self._entries.clear()
        if admission.allowed:
            self._entries[tenant] = (now, admission.rate_room, admission.in_flight_room)
        else:
            self._entries[tenant] = (now, 0.0, 0)


def _too_many(code: ErrorCode, message: str, retry_after: int) -> ApiError:
    return ApiError(429, code, message, headers={"Retry-After": str(retry_after)})


def _raise_refused(admission: Admission, cap: int, limit: int) -> None:
    if admission.active is not None:
        raise _too_many(ErrorCode.TOO_MANY_JOBS,
                        f"{admission.active} of your jobs are queued or running; the limit is {cap}: "
                        "wait for some to finish, then retry", IN_FLIGHT_RETRY_AFTER_S)
    if not admission.allowed:
        raise _too_many(ErrorCode.RATE_LIMITED, f"more than {limit} job submissions per minute; retry in "
                                                f"{admission.retry_after_s} s", admission.retry_after_s)


def _unavailable() -> ApiError:
    return ApiError(503, ErrorCode.UNAVAILABLE, "the job store is unavailable; retry later")


async def enforce_submission_limits(request: Request, tenant: str) -> bool:
    """Before the body is read: the in-flight cap, then the rate limit, of the authenticated tenant,
    unless this process's :class:`LimitsMemory` shows it far from both (the create checks them anyway).

    Returns whether the request has been counted toward the rate (also True when both limits are off:
    nothing to count). Raises ApiError 429 too_many_jobs / rate_limited (with Retry-After), 503 if
    Redis is down.
    """
    # app.state, not api.deps: api.deps imports this module for the limiter classes
    services = request.app.state.services
    settings = services.settings
    cap, limit = settings.max_jobs_in_flight, settings.rate_limit_per_min
    if not (cap or limit):
        return True
    memory: LimitsMemory = request.app.state.limits_memory
    if not memory.needs_check(tenant, cap, limit, time.monotonic()):
        return False
    limiter: RateLimiter = services.limiter
    try:
        admission = await limiter.admit_async(tenant, services.store, cap, limit, time.time())
    except STORE_ERRORS as exc:
        raise _unavailable() from exc
    memory.remember(tenant, admission, time.monotonic())
    _raise_refused(admission, cap, limit)
    return True


async def create_within_limits(request: Request, tenant: str, job: Job, queue: str, message: str,
                               counted: bool, *, claim: KeyClaim | None = None) -> int | None:
    """Record ``job`` and queue its ``message`` (:meth:`broker.jobstore.JobStore.create_and_enqueue`) if
    the tenant's limits admit it, checked (and, unless ``counted``, counted) in the same atomic step,
    which also points ``claim``'s Idempotency-Key at the job. Returns the job's queue position. Raises
    ApiError 429 as :func:`enforce_submission_limits` (nothing is created) and the store's errors."""
    services = request.app.state.services
    settings = services.settings
    cap, limit = settings.max_jobs_in_flight, settings.rate_limit_per_min
    if not (cap or limit):
        if claim is not None:
            answer = await services.store.create_and_enqueue_within_async(job, queue, message, NO_QUOTA, claim=claim)
            return answer.position
        position: int | None = await services.store.create_and_enqueue_async(job, queue, message)
        return position
    limiter: RateLimiter = services.limiter
    created = await limiter.admit_and_create_async(tenant, services.store, cap, limit, time.time(), job, queue,
                                                   message, counted, claim=claim)
    request.app.state.limits_memory.remember(tenant, created.admission, time.monotonic())
    _raise_refused(created.admission, cap, limit)
    return created.position


async def count_submission(request: Request, tenant: str) -> None:
    """Count toward the rate a request that skipped the early check and ended without a create
    (a 4xx, an idempotent replay). Best effort: a store error is logged, not raised."""
    services = request.app.state.services
    if not services.settings.rate_limit_per_min:
        return
    limiter: RateLimiter = services.limiter
    try:
        await limiter.count_async(tenant, time.time())
    except STORE_ERRORS as exc:
        logger.warning("could not count a submission of %s: %s", tenant, type(exc).__name__)


LIMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorResponse, "description": "rate_limited / too_many_jobs (see the Retry-After header)",
          "headers": {"Retry-After": {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "integer"}}}},
}


# -- input limits that need no image work ---------------------------------------------------------


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(422, ErrorCode.INVALID_PARAMETER, message, param=param)


def check_input_limits(fields: dict[str, Any], sources: Any, settings: ApiSettings) -> None:
    """Prompt lengths and the number of reference images and boxes, against the settings.

    Runs on the parsed body before the job schema validates it and before any image is fetched or
    decoded. ``sources`` is the route's image sources (``references``: the reference images).
    Raises ApiError 422 invalid_parameter naming the field.
    """
    for name in ("prompt", "negative_prompt"):
        value = fields.get(name)
        if isinstance(value, str) and len(value) > settings.max_prompt_chars:
            raise _invalid(name, f"{name} is {len(value)} characters; at most {settings.max_prompt_chars}")
    references = getattr(sources, "references", None) or []
    if len(references) > settings.max_reference_images:
        raise _invalid("images", f"at most {settings.max_reference_images} reference images, "
                                 f"got {len(references)}")
    boxes = fields.get("boxes")
    if isinstance(boxes, list) and len(boxes) > settings.max_boxes:
        raise _invalid("boxes", f"at most {settings.max_boxes} boxes, got {len(boxes)}")
