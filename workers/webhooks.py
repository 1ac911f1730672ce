"""Signed webhook delivery, following Standard Webhooks (https://www.standardwebhooks.com/).

A terminal job event becomes one message in the outbox (``put``, created at most
once per id); the Celery task ``editfarm.webhook`` then calls :func:`deliver_once`
with the message id and reschedules itself while the result is ``retry``.
Delivery is at-least-once: receivers dedupe on the ``webhook-id`` header.
Secrets and signatures are never logged. Times are UNIX epoch seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import re
import secrets as _secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import redis

from broker import keys
from broker.urlpolicy import HostDoesNotResolve, Resolver, UrlNotAllowed, check_url, system_resolver
from broker.views import iso

log = logging.getLogger("editfarm.webhooks")

USER_AGENT = "editfarm-webhooks/0.1"
EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.canceled", "job.started", "job.progress"})
TERMINAL_EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.canceled"})
# Standard Webhooks' example schedule: delay (s) before attempt 1, 2, 3, ...
DEFAULT_RETRY_SCHEDULE_S: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
DEFAULT_TTL_S = 7 * 24 * 3600
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
State = Literal["pending", "delivered", "failed"]
_EARLY_S = 1.0  # a task may run this much before next_attempt_at (clock skew between workers)


def _secret_key(secret: str) -> bytes:
    """Key bytes of a secret: ``whsec_<base64>`` is base64-decoded; any other string is used as its
    raw UTF-8 bytes (receivers then verify with ``Webhook(secret.encode())``). Raises ValueError."""
    if secret.startswith("whsec_"):
        b64 = secret[len("whsec_"):].rstrip("=")
        try:
            key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except ValueError as exc:
            raise ValueError("webhook secret 'whsec_…' is not valid base64") from exc
    else:
        key = secret.encode()
    if not key:
        raise ValueError("webhook secret may not be empty")
    return key


def sign(secret: str, message_id: str, timestamp_s: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp_s}.{body}">`` (see :func:`_secret_key` for the
    secret formats). Raises ValueError for an empty or malformed secret."""
    to_sign = f"{message_id}.{int(timestamp_s)}.".encode() + body
    digest = hmac.new(_secret_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_all(secrets: Sequence[str], message_id: str, timestamp_s: int, body: bytes) -> str:
    """Space-separated signatures, one per secret (key rotation). Raises ValueError if none."""
    if not secrets:
        raise ValueError("at least one webhook secret is required")
    return " ".join(sign(s, message_id, timestamp_s, body) for s in secrets)


def signed_headers(secrets: Sequence[str], message_id: str, body: bytes, timestamp_s: int) -> dict[str, str]:
    """The Standard Webhooks request headers of one attempt (a fresh timestamp each time)."""
    return {
        "webhook-id": message_id, "webhook-timestamp": str(timestamp_s),
        "webhook-signature": sign_all(secrets, message_id, timestamp_s, body),
        "content-type": "application/json", "user-agent": USER_AGENT,
    }


def message_id_for(job_id: str, event_type: str) -> str:
    """Deterministic ``webhook-id`` of a job's event, e.g. ``msg_job_ab12_job_succeeded``.

    Raises ValueError for an unknown event type or a job id outside ``[A-Za-z0-9_.-]``."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    if not _ID_RE.match(job_id):
        raise ValueError(f"job id {job_id!r} is not usable in a message id")
    return f"msg_{job_id}_{event_type.replace('.', '_')}"


def build_body(event_type: str, data: dict[str, Any], timestamp_s: float) -> bytes:
    """Compact UTF-8 JSON ``{"type", "timestamp" (ISO-8601 UTC), "data"}``; ``data`` is the public
    job view (:func:`broker.views.job_view`). Raises ValueError for an unknown event type."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    payload = {"type": event_type, "timestamp": iso(timestamp_s), "data": data}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def next_delay_s(attempt: int, schedule: Sequence[float], jitter: float,
                 rng: Callable[[], float] = random.random, max_attempts: int | None = None) -> float | None:
    """Seconds to wait before the attempt after ``attempt`` (1-based count of attempts made), or None
    when no attempts remain. ``schedule[i]`` is the delay before attempt ``i+1`` (the last entry
    repeats if ``max_attempts`` exceeds it; by default ``max_attempts = len(schedule)``). Jitter only
    lengthens: the result lies in ``[d, d * (1 + jitter)]``."""
    limit = len(schedule) if max_attempts is None else max_attempts
    if attempt >= limit or not schedule:
        return None
    delay = float(schedule[min(attempt, len(schedule) - 1)])
    return delay * (1.0 + jitter * rng())


@dataclass
class WebhookConfig:
    """How to sign and deliver. ``secrets``: newest first, all sign during rotation. Raises ValueError."""

    secrets: list[str]
    timeout_s: float = 15.0
    max_attempts: int = None  # type: ignore[assignment]  # None: len(retry_schedule_s)
    retry_schedule_s: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE_S
    jitter: float = 0.1
    allow_private: bool = False
    allow_http: bool = False
    busy_retry_s: float = 5.0  # retry delay when another worker holds the message's lock

    def __post_init__(self) -> None:
        if self.max_attempts is None:
            self.max_attempts = len(self.retry_schedule_s)
        for s in self.secrets:
            _secret_key(s)
        if not self.secrets:
            raise ValueError("at least one webhook secret is required")
        if self.timeout_s <= 0 or self.max_attempts < 1 or not self.retry_schedule_s:
            raise ValueError("timeout_s > 0, max_attempts >= 1 and a non-empty schedule are required")
        if any(d < 0 for d in self.retry_schedule_s) or not 0 <= self.jitter <= 1:
            raise ValueError("retry delays must be >= 0 and jitter within [0, 1]")

    @property
    def lock_ttl_ms(self) -> int:
        """Per-message lock lifetime: covers connect + write + read timeouts plus slack."""
        return int((3 * self.timeout_s + 5) * 1000)


@dataclass
class DeliveryResult:
    outcome: Literal["delivered", "retry", "failed", "done"]
    retry_in_s: float | None = None
    status_code: int | None = None
    attempt: int | None = None  # number of the attempt this call made (None: none made)
    error: str | None = None


@dataclass
class WebhookMessage:
    id: str
    url: str
    body: bytes
    tenant: str
    state: State = "pending"
    attempts: int = 0
    created_at: float = 0.0
    finished_at: float | None = None
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None  # epoch s of the scheduled retry


def make_client(config: WebhookConfig) -> httpx.Client:
    """An httpx client fit for webhooks: no env proxies (they would bypass the URL policy), no redirects."""
    return httpx.Client(trust_env=False, follow_redirects=False, timeout=config.timeout_s,
                        headers={"user-agent": USER_AGENT})


class BaseWebhookOutbox(ABC):
    """Storage of webhook messages and their attempts; records expire ``ttl_s`` after the last write."""

    def __init__(self, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.ttl_s = ttl_s

    @staticmethod
    def _new_fields(message_id: str, url: str, body: bytes, tenant: str) -> dict[str, str | bytes]:
        if not _ID_RE.match(message_id):
            raise ValueError(f"message id {message_id!r} must match {_ID_RE.pattern}")
        return {"url": url, "body": body, "tenant": tenant, "state": "pending", "attempts": "0",
                "created_at": repr(time.time())}

    @staticmethod
    def _parse(message_id: str, raw: dict[Any, Any]) -> WebhookMessage:
        b = {(k.decode() if isinstance(k, bytes) else k): (v if isinstance(v, bytes) else str(v).encode())
             for k, v in raw.items()}
        f = {k: v.decode() for k, v in b.items() if k != "body"}
        code, fin, nxt = f.get("status_code"), f.get("finished_at"), f.get("next_attempt_at")
        return WebhookMessage(
            id=message_id, url=f["url"], body=b["body"], tenant=f["tenant"],
            state=f["state"], attempts=int(f.get("attempts", 0)),  # type: ignore[arg-type]
            created_at=float(f.get("created_at", 0)), finished_at=float(fin) if fin else None,
            status_code=int(code) if code else None, error=f.get("error") or None,
            next_attempt_at=float(nxt) if nxt else None)

    @abstractmethod
    def put(self, message_id: str, url: str, body: bytes, tenant: str) -> bool:
        """Create a pending message; False (and no change) if the id exists. Raises ValueError on a bad id."""

    @abstractmethod
    def get(self, message_id: str) -> WebhookMessage | None: ...

    @abstractmethod
    def _update(self, message_id: str, fields: dict[str, str]) -> bool: ...

    @abstractmethod
    def record_attempt(self, message_id: str, attempt: dict[str, Any]) -> int:
        """Append an attempt record and bump the count; returns the new count (0: no such message)."""

    @abstractmethod
    def attempts(self, message_id: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def acquire_lock(self, message_id: str, ttl_ms: int) -> str | None:
        """A token if this caller now holds the message's delivery lock, else None."""

    @abstractmethod
    def release_lock(self, message_id: str, token: str) -> None: ...

    def mark_delivered(self, message_id: str, status_code: int, at_s: float) -> bool:
        return self._update(message_id, {"state": "delivered", "status_code": str(status_code),
                                         "finished_at": repr(at_s), "error": ""})

    def mark_retry(self, message_id: str, next_attempt_at: float) -> bool:
        """Note when the next attempt is due (epoch s); earlier (duplicate) task runs then wait."""
        return self._update(message_id, {"next_attempt_at": repr(next_attempt_at)})

    def mark_failed(self, message_id: str, error: str, at_s: float, status_code: int | None = None) -> bool:
        return self._update(message_id, {"state": "failed", "error": error, "finished_at": repr(at_s),
                                         "status_code": "" if status_code is None else str(status_code)})


# HSET + EXPIRE only if EXISTS(key) == ARGV[2]: "0" creates once (HSETNX-like), "1" updates.
_HSET_IF = """if redis.call('EXISTS', KEYS[1]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3)); redis.call('EXPIRE', KEYS[1], ARGV[1]); return 1"""
_RECORD = """if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1); redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[2], ARGV[1]); return n"""
_UNLOCK = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"""


def _lock_key(message_id: str) -> str:
    return keys.webhook_lock(message_id)


class WebhookOutbox(BaseWebhookOutbox):
    """The outbox on Redis (``keys.webhook_message``/``webhook_attempts``); works with either
    ``decode_responses`` setting. Raises redis.RedisError when Redis is unreachable."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULT_TTL_S) -> None:
        super().__init__(ttl_s)
        self.r = client

    def _eval(self, script: str, keys_: list[str], args: list[Any]) -> int:
        return int(self.r.eval(script, len(keys_), *keys_, *args))

    def put(self, message_id: str, url: str, body: bytes, tenant: str) -> bool:
        flat = [x for kv in self._new_fields(message_id, url, body, tenant).items() for x in kv]
        return self._eval(_HSET_IF, [keys.webhook_message(message_id)], [self.ttl_s, 0, *flat]) == 1

    def get(self, message_id: str) -> WebhookMessage | None:
        raw = self.r.hgetall(keys.webhook_message(message_id))
        return self._parse(message_id, raw) if raw else None  # type: ignore[arg-type]

    def _update(self, message_id: str, fields: dict[str, str]) -> bool:
        flat = [x for kv in fields.items() for x in kv]
        return self._eval(_HSET_IF, [keys.webhook_message(message_id)], [self.ttl_s, 1, *flat]) == 1

    def record_attempt(self, message_id: str, attempt: dict[str, Any]) -> int:
        ks = [keys.webhook_message(message_id), keys.webhook_attempts(message_id)]
        return self._eval(_RECORD, ks, [self.ttl_s, json.dumps(attempt, separators=(",", ":"))])

    def attempts(self, message_id: str) -> list[dict[str, Any]]:
        raw = self.r.lrange(keys.webhook_attempts(message_id), 0, -1)
        return [json.loads(x) for x in raw]  # type: ignore[union-attr]

    def acquire_lock(self, message_id: str, ttl_ms: int) -> str | None:
        token = _secrets.token_hex(8)
        return token if self.r.set(_lock_key(message_id), token, nx=True, px=ttl_ms) else None

    def release_lock(self, message_id: str, token: str) -> None:
        self._eval(_UNLOCK, [_lock_key(message_id)], [token])


class InMemoryWebhookOutbox(BaseWebhookOutbox):
    """Process-local stand-in for unit tests (no TTLs, locks expire by monotonic clock)."""

    def __init__(self, ttl_s: int = DEFAULT_TTL_S) -> None:
        super().__init__(ttl_s)
        self._mu = threading.Lock()
        self.messages: dict[str, dict[str, Any]] = {}
        self.attempt_log: dict[str, list[str]] = {}
        self.locks: dict[str, tuple[str, float]] = {}

    def put(self, message_id: str, url: str, body: bytes, tenant: str) -> bool:
        fields = self._new_fields(message_id, url, body, tenant)
        with self._mu:
            return self.messages.setdefault(message_id, fields) is fields

    def get(self, message_id: str) -> WebhookMessage | None:
        with self._mu:
            raw = dict(self.messages.get(message_id) or {})
        return self._parse(message_id, raw) if raw else None

    def _update(self, message_id: str, fields: dict[str, str]) -> bool:
        with self._mu:
            if message_id in self.messages:
                self.messages[message_id].update(fields)
            return message_id in self.messages

    def record_attempt(self, message_id: str, attempt: dict[str, Any]) -> int:
        with self._mu:
            if message_id not in self.messages:
                return 0
            self.attempt_log.setdefault(message_id, []).append(json.dumps(attempt))
            n = int(self.messages[message_id]["attempts"]) + 1
            self.messages[message_id]["attempts"] = str(n)
            return n

    def attempts(self, message_id: str) -> list[dict[str, Any]]:
        with self._mu:
            return [json.loads(x) for x in self.attempt_log.get(message_id, [])]

    def acquire_lock(self, message_id: str, ttl_ms: int) -> str | None:
        with self._mu:
            held = self.locks.get(message_id)
            if held and held[1] > time.monotonic():
                return None
            token = _secrets.token_hex(8)
            self.locks[message_id] = (token, time.monotonic() + ttl_ms / 1000)
            return token

    def release_lock(self, message_id: str, token: str) -> None:
        with self._mu:
            if self.locks.get(message_id, ("",))[0] == token:
                del self.locks[message_id]


def deliver_once(outbox: BaseWebhookOutbox, message_id: str, config: WebhookConfig, client: httpx.Client,
                 now: Callable[[], float] = time.time, *, resolver: Resolver = system_resolver,
                 rng: Callable[[], float] = random.random) -> DeliveryResult:
    """Make at most one delivery attempt of a stored message and record it.

    Outcomes: ``done`` (already delivered/failed: nothing sent), ``delivered`` (2xx), ``failed``
    (410, URL refused by policy, or attempts exhausted), ``retry`` (3xx/4xx/5xx, timeout, connection
    or DNS lookup error, another worker holds the message's lock, or the scheduled retry is not due
    yet, e.g. a redelivered Celery message: nothing sent; wait ``retry_in_s`` seconds).
    ``resolver`` feeds :func:`check_url`; ``rng`` draws the jitter.
    Raises LookupError if the message does not exist (expired or never created), redis.RedisError.
    """
    msg = outbox.get(message_id)
    if msg is None:
        raise LookupError(f"webhook message {message_id!r} not found")
    if msg.state != "pending":
        return DeliveryResult("done", status_code=msg.status_code)
    token = outbox.acquire_lock(message_id, config.lock_ttl_ms)
    if token is None:
        return DeliveryResult("retry", retry_in_s=config.busy_retry_s, error="locked")
    try:
        msg = outbox.get(message_id)  # re-read under the lock: another worker may have finished
        if msg is None or msg.state != "pending":
            return DeliveryResult("done", status_code=msg.status_code if msg else None)
        if msg.next_attempt_at and (wait := msg.next_attempt_at - now()) > _EARLY_S:
            return DeliveryResult("retry", retry_in_s=wait, error="not due")
        if msg.attempts >= config.max_attempts:
            outbox.mark_failed(message_id, msg.error or "attempts exhausted", now())
            return DeliveryResult("failed", attempt=None, error="attempts exhausted")
        return _attempt(outbox, msg, config, client, now, resolver, rng)
    finally:
        outbox.release_lock(message_id, token)


def _attempt(outbox: BaseWebhookOutbox, msg: WebhookMessage, config: WebhookConfig, client: httpx.Client,
             now: Callable[[], float], resolver: Resolver, rng: Callable[[], float]) -> DeliveryResult:
    n, started, t0 = msg.attempts + 1, now(), time.monotonic()
    status: int | None = None
    error: str | None = None
    permanent = False
    try:
        check_url(msg.url, allow_http=config.allow_http, allow_private=config.allow_private,
                  resolver=resolver)
        headers = signed_headers(config.secrets, msg.id, msg.body, int(now()))
        # stream: only the status line and headers are read, the body is never downloaded
        with client.stream("POST", msg.url, content=msg.body, headers=headers,
                           timeout=config.timeout_s, follow_redirects=False) as resp:
            status = resp.status_code
    except UrlNotAllowed as exc:  # a DNS failure may be transient: retried, not refused
        error, permanent = f"url_not_allowed: {exc}", not isinstance(exc, HostDoesNotResolve)
    except httpx.TimeoutException as exc:
        error = f"timeout: {type(exc).__name__}"
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    duration_ms = int((time.monotonic() - t0) * 1000)
    if status is not None and not 200 <= status < 300:
        error, permanent = f"http {status}", status == 410
    outbox.record_attempt(msg.id, {"attempt": n, "at": started, "status_code": status,
                                   "error": error, "duration_ms": duration_ms})
    log.info("webhook %s attempt %d: %s (%d ms)", msg.id, n, error or status, duration_ms)
    if error is None:
        outbox.mark_delivered(msg.id, status or 0, now())
        return DeliveryResult("delivered", status_code=status, attempt=n)
    delay = None if permanent else next_delay_s(n, config.retry_schedule_s, config.jitter, rng,
                                                 config.max_attempts)
    if delay is None:
        outbox.mark_failed(msg.id, error, now(), status)
        return DeliveryResult("failed", status_code=status, attempt=n, error=error)
    outbox.mark_retry(msg.id, now() + delay)
    return DeliveryResult("retry", retry_in_s=delay, status_code=status, attempt=n, error=error)
