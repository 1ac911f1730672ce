"""Read (and re-arm) a job's webhook deliveries from the webhook workers' outbox.

The API does not import ``workers``: it reads the outbox's records through :mod:`broker.outbox`, which
owns their Redis layout. :class:`InMemoryDeliveryLog` is its twin for fake services.
"""

from __future__ import annotations

import abc
import json
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import redis

from broker.netfailure import MESSAGES as NETWORK_MESSAGES
from broker.outbox import REDELIVERY_FIELDS, OutboxRecords
from broker.tenanttext import find_leaks
from broker.views import iso

TERMINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.canceled"})
_CODE = re.compile(r"[a-z][a-z_]*")


@dataclass
class Delivery:
    """One webhook message of a job and its attempts (the public view is :meth:`view`)."""

    message_id: str
    event: str
    url: str
    tenant: str
    state: str
    attempts: list[dict[str, Any]] = field(default_factory=list)
    created_at: float | None = None
    finished_at: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id, "event": self.event, "url": self.url, "state": self.state,
            "attempts": [_attempt_view(a) for a in self.attempts],
            "created_at": _iso(self.created_at), "finished_at": _iso(self.finished_at),
        }


def _iso(ts: float | None) -> str | None:
    try:
        return iso(ts)
    except (OverflowError, ValueError, OSError):  # not a plausible epoch time
        return None


def _number(value: Any) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _attempt_view(raw: dict[str, Any]) -> dict[str, Any]:
    error = raw.get("error")
    return {"attempt": _int(raw.get("attempt")), "at": _iso(_number(raw.get("at"))),
            "status_code": _int(raw.get("status_code")), "error": _public_error(str(error)) if error else None,
            "duration_ms": _int(raw.get("duration_ms"))}


def _public_error(error: str) -> str:
    """An attempt's error as the tenant may read it. Workers record ``<code>: <sentence>``; a record
    written before they did (kept 7 days) may carry a raw exception text: its code is kept, if it
    has one, with the code's sentence, and the rest is not shown."""
    if not find_leaks(error):
        return error
    code = error.split(":", 1)[0].strip()
    if code in NETWORK_MESSAGES:
        return f"{code}: {NETWORK_MESSAGES[code]}"
    return f"{code}" if _CODE.fullmatch(code) else "request_failed: the request failed"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _event_of(message_id: str, body: Any) -> str:
    """The message's event type, from its body (``{"type": ...}``), else from its id."""
    try:
        event = json.loads(body).get("type")
        if isinstance(event, str):
            return event
    except (ValueError, TypeError, AttributeError):
        pass
    tail = message_id.rsplit("_job_", 1)
    return f"job.{tail[1]}" if len(tail) == 2 else "unknown"


def _parse(message_id: str, raw: dict[Any, Any], attempts: list[Any]) -> Delivery:
    fields = {_text(k): v for k, v in raw.items()}
    parsed = []
    for item in attempts:
        try:
            value = json.loads(item)
        except (ValueError, TypeError):
            continue
        if isinstance(value, dict):
            parsed.append(value)
    return Delivery(
        message_id=message_id, event=_event_of(message_id, fields.get("body", b"")),
        url=_text(fields.get("url", "")), tenant=_text(fields.get("tenant", "")),
        state=_text(fields.get("state", "pending")), attempts=parsed,
        created_at=_number(_text(fields.get("created_at", ""))),
        finished_at=_number(_text(fields.get("finished_at", ""))),
    )


class DeliveryLog(abc.ABC):
    """A job's webhook messages (blocking; raises the backend's errors)."""

    @abc.abstractmethod
    def message_ids(self, job_id: str) -> list[str]:
        """Ids of the messages the job produced (any order)."""

    @abc.abstractmethod
    def get(self, message_id: str) -> Delivery | None:
        """The message and its attempts; None if unknown or expired."""

    @abc.abstractmethod
    def reset(self, message_id: str) -> bool:
        """Make the message pending again with a fresh attempt budget (``attempts`` 0, no outcome);
        its attempt log is kept. False if it does not exist."""

    def for_job(self, job_id: str, tenant: str) -> list[Delivery]:
        """The job's messages that still exist and belong to ``tenant``, oldest first."""
        found = [d for d in (self.get(m) for m in self.message_ids(job_id)) if d is not None and d.tenant == tenant]
        return sorted(found, key=lambda d: (d.created_at or 0.0, d.message_id))


class RedisDeliveryLog(DeliveryLog):
    """The outbox's records on Redis (:class:`broker.outbox.OutboxRecords`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._records = OutboxRecords(client)

    def message_ids(self, job_id: str) -> list[str]:
        return sorted(self._records.job_message_ids(job_id))

    def get(self, message_id: str) -> Delivery | None:
        raw, attempts = self._records.fields_and_attempts(message_id)
        return _parse(message_id, raw, attempts) if raw else None

    def reset(self, message_id: str) -> bool:
        return self._records.redeliver(message_id)


class InMemoryDeliveryLog(DeliveryLog):
    """The same structures in process memory; tests fill them with :meth:`add` and :meth:`add_attempt`."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self.jobs: dict[str, set[str]] = {}
        self.messages: dict[str, dict[str, str]] = {}
        self.attempt_log: dict[str, list[str]] = {}

    def add(self, job_id: str, message_id: str, url: str, body: bytes | str, tenant: str, *,
            state: str = "pending", created_at: float = 0.0, finished_at: float | None = None) -> None:
        with self._mu:
            self.jobs.setdefault(job_id, set()).add(message_id)
            self.messages[message_id] = {
                "url": url, "body": _text(body), "tenant": tenant, "state": state, "attempts": "0",
                "created_at": repr(created_at), "finished_at": "" if finished_at is None else repr(finished_at),
                "status_code": "", "error": "", "next_attempt_at": ""}

    def add_attempt(self, message_id: str, attempt: dict[str, Any]) -> None:
        with self._mu:
            self.attempt_log.setdefault(message_id, []).append(json.dumps(attempt))
            fields = self.messages[message_id]
            fields["attempts"] = str(int(fields["attempts"]) + 1)

    def message_ids(self, job_id: str) -> list[str]:
        with self._mu:
            return sorted(self.jobs.get(job_id, ()))

    def get(self, message_id: str) -> Delivery | None:
        with self._mu:
            raw = dict(self.messages.get(message_id) or {})
            attempts = list(self.attempt_log.get(message_id, []))
        return _parse(message_id, raw, attempts) if raw else None

    def reset(self, message_id: str) -> bool:
        with self._mu:
            if message_id not in self.messages:
                return False
            self.messages[message_id].update(REDELIVERY_FIELDS)
            return True
