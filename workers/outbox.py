"""The webhook outbox: stored messages, their delivery attempts and per-message delivery locks.

A message is created at most once per id (``put``); a delivery attempt is made only by the
holder of the message's lock (``claim``), and recorded with the message's new state in the
same step as the lock is released (``finish_attempt``), so a delivered message is never sent
again. Records expire ``ttl_s`` after their last write. Their Redis layout and scripts are
:mod:`broker.outbox`'s (the API's delivery log reads the same records). Times are UNIX epoch seconds.
"""

from __future__ import annotations

import json
import re
import secrets as _secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import redis

from broker.outbox import DEFAULT_TTL_S, OutboxRecords

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
State = Literal["pending", "delivered", "failed"]


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
    def put(self, message_id: str, url: str, body: bytes, tenant: str, job_id: str | None = None) -> bool:
        """Create a pending message; False (and no change to it) if the id exists. With ``job_id`` the
        message id is also added to that job's delivery log (``keys.job_webhooks``), created or not.
        Raises ValueError on a bad id."""

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

    def claim(self, message_id: str, ttl_ms: int) -> tuple[WebhookMessage | None, str | None]:
        """The message, and a lock token if it is ``pending`` and this caller now holds its delivery
        lock (None: another caller holds it, or the message is no longer pending). (None, None): no
        such message. The Redis outbox does this in one atomic step."""
        msg = self.get(message_id)
        if msg is None or msg.state != "pending":
            return msg, None
        token = self.acquire_lock(message_id, ttl_ms)
        if token is None:
            return msg, None
        msg = self.get(message_id)  # re-read under the lock: another worker may have finished
        if msg is None or msg.state != "pending":
            self.release_lock(message_id, token)
            return msg, None
        return msg, token

    def finish_attempt(self, message_id: str, attempt: dict[str, Any], fields: dict[str, str],
                       token: str) -> int:
        """Record an attempt, set the message's new ``fields`` (see ``*_fields``) and release the lock
        ``token``; returns the new attempt count (0: no such message; the lock is released anyway).
        The Redis outbox does this in one atomic step."""
        try:
            n = self.record_attempt(message_id, attempt)
            if n:
                self._update(message_id, fields)
            return n
        finally:
            self.release_lock(message_id, token)

    @staticmethod
    def delivered_fields(status_code: int, at_s: float) -> dict[str, str]:
        return {"state": "delivered", "status_code": str(status_code), "finished_at": repr(at_s), "error": ""}

    @staticmethod
    def retry_fields(next_attempt_at: float) -> dict[str, str]:
        return {"next_attempt_at": repr(next_attempt_at)}

    @staticmethod
    def failed_fields(error: str, at_s: float, status_code: int | None = None) -> dict[str, str]:
        return {"state": "failed", "error": error, "finished_at": repr(at_s),
                "status_code": "" if status_code is None else str(status_code)}

    def mark_failed(self, message_id: str, error: str, at_s: float, status_code: int | None = None) -> bool:
        return self._update(message_id, self.failed_fields(error, at_s, status_code))


class WebhookOutbox(BaseWebhookOutbox):
    """The outbox on Redis, in the layout :mod:`broker.outbox` owns (shared with the API's delivery
    log); works with either ``decode_responses`` setting. Raises redis.RedisError when Redis is
    unreachable."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULT_TTL_S) -> None:
        super().__init__(ttl_s)
        self.r = client
        self._records = OutboxRecords(client, ttl_s)

    def put(self, message_id: str, url: str, body: bytes, tenant: str, job_id: str | None = None) -> bool:
        return self._records.put(message_id, self._new_fields(message_id, url, body, tenant), job_id)

    def claim(self, message_id: str, ttl_ms: int) -> tuple[WebhookMessage | None, str | None]:
        token = _secrets.token_hex(8)
        locked, raw = self._records.claim(message_id, token, ttl_ms)
        if not raw:
            return None, None
        return self._parse(message_id, raw), token if locked else None

    def finish_attempt(self, message_id: str, attempt: dict[str, Any], fields: dict[str, str],
                       token: str) -> int:
        return self._records.finish(message_id, attempt, fields, token)

    def get(self, message_id: str) -> WebhookMessage | None:
        raw = self._records.fields(message_id)
        return self._parse(message_id, raw) if raw else None

    def _update(self, message_id: str, fields: dict[str, str]) -> bool:
        return self._records.update(message_id, fields)

    def record_attempt(self, message_id: str, attempt: dict[str, Any]) -> int:
        return self._records.record_attempt(message_id, attempt)

    def attempts(self, message_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self._records.attempts(message_id)]

    def acquire_lock(self, message_id: str, ttl_ms: int) -> str | None:
        token = _secrets.token_hex(8)
        return token if self._records.lock(message_id, token, ttl_ms) else None

    def release_lock(self, message_id: str, token: str) -> None:
        self._records.unlock(message_id, token)
