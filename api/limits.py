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

Both run as a route dependency after authentication and before the body is read. Every
``POST /v1/jobs`` counts toward the rate, including refused and idempotent-replayed ones.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import threading
import time
from typing import Any

import redis
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from api.auth import TenantDep
from api.errors import ApiError, ErrorResponse
from api.settings import ApiSettings
from broker import keys
from broker.schema import ErrorCode

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


# KEYS: this window's counter, the previous window's. ARGV: weight of the previous window, limit, ttl.
_HIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[1]) + current > tonumber(ARGV[2]) - 1 then return {0, previous, current} end
current = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, previous, current}
"""


class RedisRateLimiter(RateLimiter):
    """The sliding-window counter on Redis (shared by every API replica)."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_HIT)

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
    try:
        if settings.max_jobs_in_flight:
            active = await run_in_threadpool(services.store.tenant_active_count, tenant)
            if active >= settings.max_jobs_in_flight:
                raise _too_many(ErrorCode.TOO_MANY_JOBS,
                                f"{active} of your jobs are queued or running; the limit is "
                                f"{settings.max_jobs_in_flight}: wait for some to finish, then retry",
                                IN_FLIGHT_RETRY_AFTER_S)
        if settings.rate_limit_per_min:
            limit = settings.rate_limit_per_min
            decision = await run_in_threadpool(services.limiter.hit, tenant, limit, time.time())
            if not decision.allowed:
                raise _too_many(ErrorCode.RATE_LIMITED,
                                f"more than {limit} job submissions per minute; retry in "
                                f"{decision.retry_after_s} s", decision.retry_after_s)
    except STORE_ERRORS as exc:
        raise ApiError(503, ErrorCode.UNAVAILABLE, "the job store is unavailable; retry later") from exc


SUBMISSION_LIMITS = Depends(enforce_submission_limits)
"""For a route's ``dependencies=[...]``."""

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
