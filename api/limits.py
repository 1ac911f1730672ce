"""Per-tenant limits on ``POST /v1/jobs`` and the cheap input checks that run before any image work.

* **Rate limit** (``EDITFARM_RATE_LIMIT_PER_MIN``, 0 = off): a sliding-window counter. Each tenant has
  one Redis counter per fixed 60 s window (``keys.rate_window``); a submission is allowed while
  ``previous window × (the share of it still inside the last 60 s) + current window`` stays below
  the limit, so a burst cannot double up at a window edge. Check-and-count is one Lua script
  (atomic across API replicas); refused requests are not counted. Over the limit → 429
  ``rate_limited`` with ``Retry-After`` (seconds until one more submission fits).
* **Jobs in flight** (``EDITFARM_MAX_JOBS_IN_FLIGHT``, 0 = off): the tenant's queued + running jobs
  (:meth:`broker.store.JobStore.tenant_active_count`) → 429 ``too_many_jobs`` with ``Retry-After``.

Where they are checked: the authoritative check is part of the job's creation. On Redis the
create-and-enqueue script (:meth:`broker.store.RedisJobStore.create_and_enqueue_within`) checks both
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

import abc
import asyncio
import dataclasses
import logging
import math
import threading
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Request

from api.errors import STORE_ERRORS, ApiError, ErrorResponse
from api.settings import ApiSettings
from broker import keys
from broker.schema import ErrorCode, Job
from broker.store import QUOTA_LUA, InMemoryJobStore, JobStore, Quota, QuotaAnswer, RedisJobStore

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


def _fits(previous: int, current: int, elapsed: float, limit: int) -> bool:
    return previous * (1.0 - elapsed / WINDOW_S) + current <= limit - 1


def _room(previous: int, current: int, elapsed: float, limit: int) -> float:
    """How many more submissions fit the rate now (fractional: the previous window decays)."""
    return limit - (previous * (1.0 - elapsed / WINDOW_S) + current)


def retry_after_s(previous: int, current: int, elapsed: float, limit: int) -> int:
    """Whole seconds until ``_fits`` holds again, assuming no other request is counted meanwhile."""
    room = limit - 1 - current
    if room >= 0 and previous > 0:
        # still this window: the previous window's weight must decay enough
        wait = WINDOW_S * (1.0 - room / previous) - elapsed
    else:
        # the next window, where this window's count becomes the decaying "previous"
        wait = WINDOW_S - elapsed + WINDOW_S * max(0.0, 1.0 - (limit - 1) / max(current, 1))
    return max(1, math.ceil(wait))


def _decide(allowed: bool, previous: int, current: int, elapsed: float, limit: int) -> RateDecision:
    if allowed:
        return RateDecision(True, room=_room(previous, current, elapsed, limit))
    return RateDecision(False, retry_after_s(previous, current, elapsed, limit))


class RateLimiter(abc.ABC):
    """Counts a tenant's submissions; one :meth:`hit` per request."""

    def __init__(self) -> None:
        # the generic admit_and_create: check, count and create as one step within this process
        self._create_lock = threading.Lock()

    @abc.abstractmethod
    def hit(self, tenant: str, limit: int, now: float, count: bool = True) -> RateDecision:
        """Count one submission if it fits within ``limit`` per minute (blocking; raises the store's
        errors). ``count=False`` only reads: allowed when one more would fit (its ``room`` counts
        nothing more)."""

    def count(self, tenant: str, now: float) -> None:
        """Count one submission toward the rate without checking it (blocking; raises the store's errors)."""
        self.hit(tenant, 1 << 62, now)

    async def count_async(self, tenant: str, now: float) -> None:
        """:meth:`count` for the event loop (this default runs it in a thread)."""
        await asyncio.to_thread(self.count, tenant, now)

    def admit(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float) -> Admission:
        """The in-flight cap (``store``'s count of the tenant's active jobs; 0 = off), then the rate
        (:meth:`hit`; 0 = off). Blocking; raises the stores' errors."""
        in_flight_room = None
        if max_in_flight:
            active = store.tenant_active_count(tenant)
            if active >= max_in_flight:
                return Admission(False, active=active)
            in_flight_room = max_in_flight - active - 1  # this submission's job to come
        rate_room = None
        if limit:
            decision = self.hit(tenant, limit, now)
            if not decision.allowed:
                return Admission(False, retry_after_s=decision.retry_after_s)
            rate_room = decision.room
        return Admission(True, rate_room=rate_room, in_flight_room=in_flight_room)

    async def admit_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                          now: float) -> Admission:
        """:meth:`admit` for the event loop (this default runs it in a thread)."""
        return await asyncio.to_thread(self.admit, tenant, store, max_in_flight, limit, now)

    def admit_and_create(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float,
                         job: Job, queue: str, message: str, counted: bool) -> Created:
        """The limits, then :meth:`JobStore.create_and_enqueue`, as one step: refused, nothing is
        created. ``counted``: this submission was counted toward the rate already (by :meth:`admit`),
        so only the in-flight cap is checked again. Blocking; raises the stores' errors.

        This default is atomic within one process (a lock); :class:`RedisRateLimiter` with a
        :class:`~broker.store.RedisJobStore` does it in the store's create script."""
        with self._create_lock:
            if counted:
                admission = self.admit(tenant, store, max_in_flight, 0, now)
                if admission.allowed and limit:
                    admission = dataclasses.replace(admission, rate_room=self.hit(tenant, limit, now, False).room)
            else:
                admission = self.admit(tenant, store, max_in_flight, limit, now)
            if not admission.allowed:
                return Created(admission)
            return Created(admission, store.create_and_enqueue(job, queue, message))

    async def admit_and_create_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                                     now: float, job: Job, queue: str, message: str, counted: bool) -> Created:
        """:meth:`admit_and_create` for the event loop (this default runs it in a thread)."""
        return await asyncio.to_thread(self.admit_and_create, tenant, store, max_in_flight, limit, now,
                                       job, queue, message, counted)


# KEYS: this window's counter, the previous window's. ARGV: weight of the previous window, limit, ttl,
# '1' to count ('0': only read).
_HIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[1]) + current > tonumber(ARGV[2]) - 1 then return {0, previous, current} end
if ARGV[4] == '0' then return {1, previous, current} end
current = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, previous, current}
"""

# KEYS: this window's counter. ARGV: ttl.
_COUNT = """
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


# Both limits in one round trip, same order and counting as RateLimiter.admit. KEYS: the tenant's
# active set (RedisJobStore keeps it), this window's counter, the previous window's. ARGV: max jobs
# in flight (0: off), weight of the previous window, rate limit (0: off), counter ttl.
# Returns {1, active, previous, current} (allowed; active -1: the cap is off; current after counting),
# {-1, active} (too many jobs) or {0, previous, current} (rate limited).
_ADMIT = QUOTA_LUA + """
local code, active, previous, current = quota(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[3]),
                                              tonumber(ARGV[2]), ARGV[4], true)
if code == -3 then return {-1, active} end
if code == -4 then return {0, previous, current} end
return {1, active, previous, current}
"""


class RedisRateLimiter(RateLimiter):
    """The sliding-window counter on Redis (shared by every API replica).

    With a :class:`~broker.store.RedisJobStore` (whose per-tenant active set is on the same server)
    :meth:`admit` checks both limits in one script, and :meth:`admit_and_create` checks them inside
    the store's create-and-enqueue script; ``async_client`` runs them on the event loop, each
    call bounded by ``async_timeout_s`` (see :class:`~broker.store.RedisJobStore` for why the client
    itself should have no ``socket_timeout``).
    """

    def __init__(self, client: redis.Redis, async_client: aioredis.Redis | None = None,
                 async_timeout_s: float = 10.0) -> None:
        super().__init__()
        self._async_timeout_s = async_timeout_s
        self._script = client.register_script(_HIT)
        self._count = client.register_script(_COUNT)
        self._admit = client.register_script(_ADMIT)
        self._admit_on_loop = async_client.register_script(_ADMIT) if async_client is not None else None
        self._count_on_loop = async_client.register_script(_COUNT) if async_client is not None else None

    @staticmethod
    def _admit_args(tenant: str, max_in_flight: int, limit: int, now: float) -> tuple[list[str], list[Any], float]:
        index, elapsed = _window(now)
        script_keys = [keys.tenant_active(tenant), keys.rate_window(tenant, index),
                       keys.rate_window(tenant, index - 1)]
        return script_keys, [max_in_flight, repr(1.0 - elapsed / WINDOW_S), limit, _COUNTER_TTL_S], elapsed

    @staticmethod
    def _admission(answer: list[Any], max_in_flight: int, limit: int, elapsed: float) -> Admission:
        if int(answer[0]) == -1:
            return Admission(False, active=int(answer[1]))
        if int(answer[0]) == 0:
            return Admission(False, retry_after_s=retry_after_s(int(answer[1]), int(answer[2]), elapsed, limit))
        active, previous, current = (int(v) for v in answer[1:4])
        return Admission(True, rate_room=_room(previous, current, elapsed, limit) if limit else None,
                         in_flight_room=max_in_flight - active - 1 if max_in_flight else None)

    def admit(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float) -> Admission:
        if not isinstance(store, RedisJobStore):
            return super().admit(tenant, store, max_in_flight, limit, now)
        script_keys, args, elapsed = self._admit_args(tenant, max_in_flight, limit, now)
        return self._admission(self._admit(keys=script_keys, args=args), max_in_flight, limit, elapsed)

    async def admit_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                          now: float) -> Admission:
        if self._admit_on_loop is None or not isinstance(store, RedisJobStore):
            return await super().admit_async(tenant, store, max_in_flight, limit, now)
        script_keys, args, elapsed = self._admit_args(tenant, max_in_flight, limit, now)
        async with asyncio.timeout(self._async_timeout_s):
            answer = await self._admit_on_loop(keys=script_keys, args=args)
        return self._admission(answer, max_in_flight, limit, elapsed)

    @staticmethod
    def _quota(tenant: str, max_in_flight: int, limit: int, now: float, counted: bool) -> tuple[Quota, float]:
        index, elapsed = _window(now)
        return Quota(max_in_flight, limit, (keys.rate_window(tenant, index), keys.rate_window(tenant, index - 1)),
                     1.0 - elapsed / WINDOW_S, _COUNTER_TTL_S, not counted), elapsed

    def admit_and_create(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float,
                         job: Job, queue: str, message: str, counted: bool) -> Created:
        if not isinstance(store, RedisJobStore):
            return super().admit_and_create(tenant, store, max_in_flight, limit, now, job, queue, message, counted)
        quota, elapsed = self._quota(tenant, max_in_flight, limit, now, counted)
        return _created(store.create_and_enqueue_within(job, queue, message, quota), max_in_flight, limit, elapsed)

    async def admit_and_create_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                                     now: float, job: Job, queue: str, message: str, counted: bool) -> Created:
        if not isinstance(store, RedisJobStore):
            return await super().admit_and_create_async(tenant, store, max_in_flight, limit, now, job, queue,
                                                        message, counted)
        quota, elapsed = self._quota(tenant, max_in_flight, limit, now, counted)
        answer = await store.create_and_enqueue_within_async(job, queue, message, quota)
        return _created(answer, max_in_flight, limit, elapsed)

    def hit(self, tenant: str, limit: int, now: float, count: bool = True) -> RateDecision:
        index, elapsed = _window(now)
        weight = 1.0 - elapsed / WINDOW_S
        allowed, previous, current = self._script(
            keys=[keys.rate_window(tenant, index), keys.rate_window(tenant, index - 1)],
            args=[repr(weight), limit, _COUNTER_TTL_S, "1" if count else "0"],
        )
        return _decide(bool(allowed), int(previous), int(current), elapsed, limit)

    def count(self, tenant: str, now: float) -> None:
        self._count(keys=[keys.rate_window(tenant, _window(now)[0])], args=[_COUNTER_TTL_S])

    async def count_async(self, tenant: str, now: float) -> None:
        if self._count_on_loop is None:
            return await super().count_async(tenant, now)
        async with asyncio.timeout(self._async_timeout_s):
            await self._count_on_loop(keys=[keys.rate_window(tenant, _window(now)[0])], args=[_COUNTER_TTL_S])


def _created(answer: QuotaAnswer, max_in_flight: int, limit: int, elapsed: float) -> Created:
    if answer.refused == "in_flight":
        return Created(Admission(False, active=answer.active))
    if answer.refused == "rate":
        return Created(Admission(False, retry_after_s=retry_after_s(answer.previous, answer.current, elapsed,
                                                                     limit)))
    return Created(Admission(True, rate_room=_room(answer.previous, answer.current, elapsed, limit) if limit
                             else None, in_flight_room=max_in_flight - answer.active if max_in_flight else None),
                   answer.position)


class InMemoryRateLimiter(RateLimiter):
    """The same algorithm in process memory (unit tests, fake services)."""

    def __init__(self) -> None:
        super().__init__()
        self._mu = threading.Lock()
        self._counts: dict[tuple[str, int], int] = {}

    def hit(self, tenant: str, limit: int, now: float, count: bool = True) -> RateDecision:
        index, elapsed = _window(now)
        with self._mu:
            for stale in [k for k in self._counts if k[1] < index - 1]:
                del self._counts[stale]
            previous = self._counts.get((tenant, index - 1), 0)
            current = self._counts.get((tenant, index), 0)
            if not _fits(previous, current, elapsed, limit):
                return _decide(False, previous, current, elapsed, limit)
            if count:
                current = self._counts[(tenant, index)] = current + 1
            return _decide(True, previous, current, elapsed, limit)

    async def admit_and_create_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                                     now: float, job: Job, queue: str, message: str, counted: bool) -> Created:
        if isinstance(store, InMemoryJobStore):  # no I/O: no thread needed
            return self.admit_and_create(tenant, store, max_in_flight, limit, now, job, queue, message, counted)
        return await super().admit_and_create_async(tenant, store, max_in_flight, limit, now, job, queue,
                                                    message, counted)


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
                               counted: bool) -> int | None:
    """Record ``job`` and queue its ``message`` (:meth:`broker.store.JobStore.create_and_enqueue`) if
    the tenant's limits admit it, checked (and, unless ``counted``, counted) in the same atomic step.
    Returns the job's queue position. Raises ApiError 429 as :func:`enforce_submission_limits` (nothing
    is created) and the store's errors."""
    services = request.app.state.services
    settings = services.settings
    cap, limit = settings.max_jobs_in_flight, settings.rate_limit_per_min
    if not (cap or limit):
        position: int | None = await services.store.create_and_enqueue_async(job, queue, message)
        return position
    limiter: RateLimiter = services.limiter
    created = await limiter.admit_and_create_async(tenant, services.store, cap, limit, time.time(), job, queue,
                                                   message, counted)
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
