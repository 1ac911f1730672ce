"""Signed webhook delivery, following Standard Webhooks (https://www.standardwebhooks.com/).

A terminal job event becomes one message in the outbox (``put``, created at most
once per id). The notify task that stored it makes the first attempt itself
(:func:`deliver_once`); a ``retry`` result queues the Celery task ``editfarm.webhook``
with the countdown, which calls :func:`deliver_once` again and reschedules itself
while the result is ``retry``. The message's lock and state make every attempt
exclusive, so a second caller never sends a delivered message again.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from broker.netfailure import describe_network_failure
from broker.tenanttext import tenant_message
from broker.urlpolicy import HostDoesNotResolve, Resolver, UrlNotAllowed, check_url, system_resolver
from broker.views import iso

# the outbox lives in its own module; its names stay importable from here
from workers.outbox import (  # noqa: F401 - re-exported
    _ID_RE,
    DEFAULT_TTL_S,
    BaseWebhookOutbox,
    State,
    WebhookMessage,
    WebhookOutbox,
)

log = logging.getLogger("editfarm.webhooks")

USER_AGENT = "editfarm-webhooks/0.1"
EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.canceled", "job.started", "job.progress"})
TERMINAL_EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.canceled"})
# Standard Webhooks' example schedule: delay (s) before attempt 1, 2, 3, ...
DEFAULT_RETRY_SCHEDULE_S: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
_EARLY_S = 1.0  # a task may run this much before next_attempt_at (clock skew between workers)
# A receiver's answer body is read up to this size (and never kept) so that its connection goes
# back to the client's keep-alive pool; a longer (or endless) body is cut off with its connection.
MAX_RESPONSE_BODY_BYTES = 64 * 1024


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


def make_client(config: WebhookConfig) -> httpx.Client:
    """An httpx client fit for webhooks: no env proxies (they would bypass the URL policy), no redirects."""
    return httpx.Client(trust_env=False, follow_redirects=False, timeout=config.timeout_s,
                        headers={"user-agent": USER_AGENT})


def deliver_once(outbox: BaseWebhookOutbox, message_id: str, config: WebhookConfig, client: httpx.Client,
                 now: Callable[[], float] = time.time, *, resolver: Resolver = system_resolver,
                 rng: Callable[[], float] = random.random,
                 config_for: Callable[[str], WebhookConfig] | None = None) -> DeliveryResult:
    """Make at most one delivery attempt of a stored message and record it.

    Outcomes: ``done`` (already delivered/failed: nothing sent), ``delivered`` (2xx), ``failed``
    (410, URL refused by policy, or attempts exhausted), ``retry`` (3xx/4xx/5xx, timeout, connection
    or DNS lookup error, another worker holds the message's lock, or the scheduled retry is not due
    yet, e.g. a redelivered Celery message: nothing sent; wait ``retry_in_s`` seconds).
    ``resolver`` feeds :func:`check_url`; ``rng`` draws the jitter. ``config_for(tenant)``, when
    given, replaces ``config`` once the message is read: its tenant's secrets sign it.
    Raises LookupError if the message does not exist (expired or never created), redis.RedisError.
    """
    msg, token = outbox.claim(message_id, config.lock_ttl_ms)
    if msg is None:
        raise LookupError(f"webhook message {message_id!r} not found")
    if msg.state != "pending":  # claim locks pending messages only
        return DeliveryResult("done", status_code=msg.status_code)
    if token is None:
        return DeliveryResult("retry", retry_in_s=config.busy_retry_s, error="locked")
    finished = False
    try:
        if msg.next_attempt_at and (wait := msg.next_attempt_at - now()) > _EARLY_S:
            return DeliveryResult("retry", retry_in_s=wait, error="not due")
        if msg.attempts >= config.max_attempts:
            outbox.mark_failed(message_id, msg.error or "attempts exhausted", now())
            return DeliveryResult("failed", attempt=None, error="attempts exhausted")
        if config_for is not None:
            config = config_for(msg.tenant)
        result = _attempt(outbox, msg, token, config, client, now, resolver, rng)
        finished = True  # its finish_attempt released the lock along with the attempt's record
        return result
    finally:
        if not finished:
            outbox.release_lock(message_id, token)


def _post(client: httpx.Client, msg: WebhookMessage, headers: dict[str, str], timeout_s: float) -> int:
    """POST the message; returns the status code. Raises httpx.HTTPError."""
    with client.stream("POST", msg.url, content=msg.body, headers=headers, timeout=timeout_s,
                       follow_redirects=False) as resp:
        # A connection goes back to the keep-alive pool only once its answer is read to the end:
        # read (and drop) a short body, within the attempt's time; a longer one closes the connection.
        # The status is the outcome either way, so a failure while reading it changes nothing.
        deadline, read = time.monotonic() + timeout_s, 0
        try:
            for chunk in resp.iter_raw():
                read += len(chunk)
                if read > MAX_RESPONSE_BODY_BYTES or time.monotonic() > deadline:
                    break
        except (httpx.HTTPError, httpx.StreamError):  # StreamError: a body that was read already
            pass
        return resp.status_code


def _attempt(outbox: BaseWebhookOutbox, msg: WebhookMessage, token: str, config: WebhookConfig,
             client: httpx.Client, now: Callable[[], float], resolver: Resolver,
             rng: Callable[[], float]) -> DeliveryResult:
    """One attempt under the message's lock ``token``; records it and releases the lock (one step)."""
    n, started, t0 = msg.attempts + 1, now(), time.monotonic()
    status: int | None = None
    error: str | None = None
    permanent = False
    try:
        check_url(msg.url, allow_http=config.allow_http, allow_private=config.allow_private,
                  resolver=resolver)
        status = _post(client, msg, signed_headers(config.secrets, msg.id, msg.body, int(now())), config.timeout_s)
    except UrlNotAllowed as exc:  # a DNS failure may be transient: retried, not refused
        error, permanent = f"url_not_allowed: {tenant_message(str(exc))}", not isinstance(exc, HostDoesNotResolve)
    except httpx.InvalidURL as exc:
        error = "invalid_url: the webhook URL is malformed"
        log.info("webhook %s attempt %d: invalid URL: %s", msg.id, n, exc)
    except httpx.HTTPError as exc:
        # the log gets the raw exception; the delivery log (read by the tenant) a code and a sentence
        code, sentence = describe_network_failure(exc)
        error = f"{code}: {sentence}"
        log.info("webhook %s attempt %d to %s failed: %s: %s", msg.id, n, msg.url, type(exc).__name__, exc)
    duration_ms = int((time.monotonic() - t0) * 1000)
    if status is not None and not 200 <= status < 300:
        error, permanent = f"http {status}", status == 410
    record = {"attempt": n, "at": started, "status_code": status, "error": error, "duration_ms": duration_ms}
    log.info("webhook %s attempt %d: %s (%d ms)", msg.id, n, error or status, duration_ms)
    if error is None:
        outbox.finish_attempt(msg.id, record, outbox.delivered_fields(status or 0, now()), token)
        return DeliveryResult("delivered", status_code=status, attempt=n)
    delay = None if permanent else next_delay_s(n, config.retry_schedule_s, config.jitter, rng,
                                                 config.max_attempts)
    if delay is None:
        outbox.finish_attempt(msg.id, record, outbox.failed_fields(error, now(), status), token)
        return DeliveryResult("failed", status_code=status, attempt=n, error=error)
    outbox.finish_attempt(msg.id, record, outbox.retry_fields(now() + delay), token)
    return DeliveryResult("retry", retry_in_s=delay, status_code=status, attempt=n, error=error)
