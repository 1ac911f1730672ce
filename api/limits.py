"""Per-tenant limits on ``POST /v1/jobs`` and the cheap input checks that run before any image work.

* **Rate limit** (``EDITFARM_RATE_LIMIT_PER_MIN``, 0 = off): a sliding-window counter. Each tenant has
  one Redis counter per fixed 60 s window (``keys.rate_window``); a submission is allowed while
  ``previous window × (the share of it still inside the last 60 s) + current window`` stays below
  the limit, so a burst cannot double up at a window edge. Check-and-count is one Lua script
  (atomic across API replicas); refused requests are not counted. Over the limit → 429
  ``rate_limited`` with ``Retry-After`` (seconds until one more submission fits).
* **Jobs in flight** (``EDITFARM_MAX_JOBS_IN_FLIGHT``, 0 = off): the tenant's queued + running jobs
  (:meth:`broker.store.JobStore.tenant_active_count`) → 429 ``too_many_jobs`` with ``Retry-After``.
  Read, then create: concurrent submissions may overshoot the cap by their number.

Both run as a route dependency after authentication and before the body is read, on Redis in one
Lua script on the event loop (:meth:`RedisRateLimiter.admit_async`). Every ``POST /v1/jobs`` within
the in-flight cap counts toward the rate, including refused and idempotent-replayed ones.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import math
import threading
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi import Request

from api.auth import TenantDep
from api.errors import ApiError, ErrorResponse
from api.settings import ApiSettings
from broker import keys
from broker.schema import ErrorCode
from broker.store import JobStore, RedisJobStore

WINDOW_S = 60
# a full window is needed as "previous" during the next one
_COUNTER_TTL_S = 2 * WINDOW_S + 5
# Retry-After of too_many_jobs: no way to know when a job ends, so a polite constant
IN_FLIGHT_RETRY_AFTER_S = 15
STORE_ERRORS = (redis.exceptions.RedisError, OSError)


@dataclasses.dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: int = 0  # when refused: seconds until one more request fits (>= 1)


@dataclasses.dataclass(frozen=True)
class Admission:
    """The submission limits' answer: allowed, or refused by the in-flight cap or by the rate."""

    allowed: bool
    active: int | None = None  # refused by the in-flight cap: the tenant's jobs queued or running
    retry_after_s: int = 0  # refused by the rate: seconds until one more request fits (>= 1)


def _window(now: float) -> tuple[int, float]:
    """(index of the fixed window holding ``now``, seconds elapsed in it)."""
    index = int(now // WINDOW_S)
    return index, now - index * WINDOW_S


def _fits(previous: int, current: int, elapsed: float, limit: int) -> bool:
    return previous * (1.0 - elapsed / WINDOW_S) + current <= limit - 1


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
        return RateDecision(True)
    return RateDecision(False, retry_after_s(previous, current, elapsed, limit))


class RateLimiter(abc.ABC):
    """Counts a tenant's submissions; one :meth:`hit` per request."""

    @abc.abstractmethod
    def hit(self, tenant: str, limit: int, now: float) -> RateDecision:
        """Count one submission if it fits within ``limit`` per minute (blocking; raises the store's errors)."""

    def admit(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float) -> Admission:
        """The in-flight cap (``store``'s count of the tenant's active jobs; 0 = off), then the rate
        (:meth:`hit`; 0 = off). Blocking; raises the stores' errors."""
        if max_in_flight:
            active = store.tenant_active_count(tenant)
            if active >= max_in_flight:
                return Admission(False, active=active)
        if limit:
            decision = self.hit(tenant, limit, now)
            if not decision.allowed:
                return Admission(False, retry_after_s=decision.retry_after_s)
        return Admission(True)

    async def admit_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                          now: float) -> Admission:
        """:meth:`admit` for the event loop (this default runs it in a thread)."""
        return await asyncio.to_thread(self.admit, tenant, store, max_in_flight, limit, now)


# KEYS: this window's counter, the previous window's. ARGV: weight of the previous window, limit, ttl.
_HIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[1]) + current > tonumber(ARGV[2]) - 1 then return {0, previous, current} end
current = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, previous, current}
"""


# Both limits in one round trip, same order and counting as RateLimiter.admit. KEYS: the tenant's
# active set (RedisJobStore keeps it), this window's counter, the previous window's. ARGV: max jobs
# in flight (0: off), weight of the previous window, rate limit (0: off), counter ttl.
# Returns {1} (allowed), {-1, active} (too many jobs) or {0, previous, current} (rate limited).
_ADMIT = """
if tonumber(ARGV[1]) > 0 then
  local active = redis.call('SCARD', KEYS[1])
  if active >= tonumber(ARGV[1]) then return {-1, active} end
end
if tonumber(ARGV[3]) == 0 then return {1} end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local previous = tonumber(redis.call('GET', KEYS[3]) or '0')
if previous * tonumber(ARGV[2]) + current > tonumber(ARGV[3]) - 1 then return {0, previous, current} end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1}
"""


class RedisRateLimiter(RateLimiter):
    """The sliding-window counter on Redis (shared by every API replica).

    With a :class:`~broker.store.RedisJobStore` (whose per-tenant active set is on the same server)
    :meth:`admit` checks both limits in one script; ``async_client`` runs it on the event loop, each
    call bounded by ``async_timeout_s`` (see :class:`~broker.store.RedisJobStore` for why the client
    itself should have no ``socket_timeout``).
    """

    def __init__(self, client: redis.Redis, async_client: aioredis.Redis | None = None,
                 async_timeout_s: float = 10.0) -> None:
        self._async_timeout_s = async_timeout_s
        self._script = client.register_script(_HIT)
        self._admit = client.register_script(_ADMIT)
        self._admit_on_loop = async_client.register_script(_ADMIT) if async_client is not None else None

    @staticmethod
    def _admit_args(tenant: str, max_in_flight: int, limit: int, now: float) -> tuple[list[str], list[Any], float]:
        index, elapsed = _window(now)
        script_keys = [keys.tenant_active(tenant), keys.rate_window(tenant, index),
                       keys.rate_window(tenant, index - 1)]
        return script_keys, [max_in_flight, repr(1.0 - elapsed / WINDOW_S), limit, _COUNTER_TTL_S], elapsed

    @staticmethod
    def _admission(answer: list[Any], limit: int, elapsed: float) -> Admission:
        if int(answer[0]) == -1:
            return Admission(False, active=int(answer[1]))
        if int(answer[0]) == 0:
            return Admission(False, retry_after_s=retry_after_s(int(answer[1]), int(answer[2]), elapsed, limit))
        return Admission(True)

    def admit(self, tenant: str, store: JobStore, max_in_flight: int, limit: int, now: float) -> Admission:
        if not isinstance(store, RedisJobStore):
            return super().admit(tenant, store, max_in_flight, limit, now)
        script_keys, args, elapsed = self._admit_args(tenant, max_in_flight, limit, now)
        return self._admission(self._admit(keys=script_keys, args=args), limit, elapsed)

    async def admit_async(self, tenant: str, store: JobStore, max_in_flight: int, limit: int,
                          now: float) -> Admission:
        if self._admit_on_loop is None or not isinstance(store, RedisJobStore):
            return await super().admit_async(tenant, store, max_in_flight, limit, now)
        script_keys, args, elapsed = self._admit_args(tenant, max_in_flight, limit, now)
        async with asyncio.timeout(self._async_timeout_s):
            answer = await self._admit_on_loop(keys=script_keys, args=args)
        return self._admission(answer, limit, elapsed)

    def hit(self, tenant: str, limit: int, now: float) -> RateDecision:
        index, elapsed = _window(now)
        weight = 1.0 - elapsed / WINDOW_S
        allowed, previous, current = self._script(
            keys=[keys.rate_window(tenant, index), keys.rate_window(tenant, index - 1)],
            args=[repr(weight), limit, _COUNTER_TTL_S],
        )
        return _decide(bool(allowed), int(previous), int(current), elapsed, limit)


class InMemoryRateLimiter(RateLimiter):
    """The same algorithm in process memory (unit tests, fake services)."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._counts: dict[tuple[str, int], int] = {}

    def hit(self, tenant: str, limit: int, now: float) -> RateDecision:
        index, elapsed = _window(now)
        with self._mu:
            for stale in [k for k in self._counts if k[1] < index - 1]:
                del self._counts[stale]
            previous = self._counts.get((tenant, index - 1), 0)
            current = self._counts.get((tenant, index), 0)
            if not _fits(previous, current, elapsed, limit):
                return _decide(False, previous, current, elapsed, limit)
            self._counts[(tenant, index)] = current + 1
            return RateDecision(True)


def _too_many(code: ErrorCode, message: str, retry_after: int) -> ApiError:
    return ApiError(429, code, message, headers={"Retry-After": str(retry_after)})


async def enforce_submission_limits(request: Request, tenant: TenantDep) -> None:
    """The in-flight cap, then the rate limit, of the authenticated tenant.

    Raises ApiError 429 too_many_jobs / rate_limited (with Retry-After), 503 if Redis is down.
    """
    # app.state, not api.deps: api.deps imports this module for the limiter classes
    services = request.app.state.services
    settings = services.settings
    cap, limit = settings.max_jobs_in_flight, settings.rate_limit_per_min
    if not (cap or limit):
        return
    limiter: RateLimiter = services.limiter
    try:
        admission = await limiter.admit_async(tenant, services.store, cap, limit, time.time())
    except STORE_ERRORS as exc:
        raise ApiError(503, ErrorCode.UNAVAILABLE, "the job store is unavailable; retry later") from exc
    if admission.active is not None:
        raise _too_many(ErrorCode.TOO_MANY_JOBS,
                        f"{admission.active} of your jobs are queued or running; the limit is {cap}: "
                        "wait for some to finish, then retry", IN_FLIGHT_RETRY_AFTER_S)
    if not admission.allowed:
        raise _too_many(ErrorCode.RATE_LIMITED, f"more than {limit} job submissions per minute; retry in "
                                                f"{admission.retry_after_s} s", admission.retry_after_s)


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
