"""The webhook outbox in tests: an in-memory outbox, and what tests read or set on any outbox.

:func:`job_messages` and :func:`mark_delivered` take the outbox rather than being methods on it:
the product never needs them (the API's delivery log reads a job's messages itself, the
delivery task marks a message in the same step that releases its lock).
"""

from __future__ import annotations

import json
import secrets as _secrets
import threading
import time
from typing import Any

from workers.outbox import DEFAULT_TTL_S, BaseWebhookOutbox, WebhookMessage, WebhookOutbox


def job_messages(outbox: BaseWebhookOutbox, job_id: str) -> set[str]:
    """The message ids in a job's delivery log (``keys.job_webhooks``)."""
    if isinstance(outbox, InMemoryWebhookOutbox):
        with outbox._mu:
            return set(outbox.links.get(job_id, ()))
    assert isinstance(outbox, WebhookOutbox), f"no delivery log to read on {type(outbox).__name__}"
    return outbox._records.job_message_ids(job_id)


def mark_delivered(outbox: BaseWebhookOutbox, message_id: str, status_code: int, at_s: float) -> bool:
    """Set a message delivered without an attempt or a lock; False if there is no such message."""
    return outbox._update(message_id, outbox.delivered_fields(status_code, at_s))


class InMemoryWebhookOutbox(BaseWebhookOutbox):
    """Process-local stand-in for unit tests (no TTLs, locks expire by monotonic clock)."""

    def __init__(self, ttl_s: int = DEFAULT_TTL_S) -> None:
        super().__init__(ttl_s)
        self._mu = threading.Lock()
        self.messages: dict[str, dict[str, Any]] = {}
        self.attempt_log: dict[str, list[str]] = {}
        self.locks: dict[str, tuple[str, float]] = {}
        self.links: dict[str, set[str]] = {}

    def put(self, message_id: str, url: str, body: bytes, tenant: str, job_id: str | None = None) -> bool:
        fields = self._new_fields(message_id, url, body, tenant)
        with self._mu:
            if job_id:
                self.links.setdefault(job_id, set()).add(message_id)
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
