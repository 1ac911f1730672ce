"""Verify webhooks sent by editfarm (Standard Webhooks, https://www.standardwebhooks.com/).

A delivery carries three headers:

- ``webhook-id``: the message id (the same on every retry: dedupe on it),
- ``webhook-timestamp``: UNIX seconds when it was signed,
- ``webhook-signature``: one or more space-separated ``v1,<base64 HMAC-SHA256>``
  of ``"{id}.{timestamp}.{body}"`` keyed with the secret (``whsec_<base64 key>``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from editfarm_client.errors import WebhookVerificationError
from editfarm_client.models import Job, WebhookMessage

#: Messages signed longer ago (or further in the future) than this are refused: replay protection.
DEFAULT_TOLERANCE_S = 5 * 60


def _secret_key(secret: str | bytes) -> bytes:
    if isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    elif secret.startswith("whsec_"):
        b64 = secret[len("whsec_"):].strip().rstrip("=")
        try:
            key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("webhook secret 'whsec_…' is not valid base64") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("webhook secret may not be empty")
    return key


def _header(headers: Mapping[str, str] | Iterable[tuple[str, str]], name: str) -> str | None:
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items:
        if key.lower() == name:
            return value
    return None


def sign_webhook(secret: str | bytes, message_id: str, timestamp: int, body: bytes | str) -> str:
    """``v1,<signature>`` for a message: what a sender puts in ``webhook-signature`` (handy in tests)."""
    raw = body.encode() if isinstance(body, str) else body
    to_sign = f"{message_id}.{int(timestamp)}.".encode() + raw
    digest = hmac.new(_secret_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_webhook(
    body: bytes | str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
    secret: str | bytes | Iterable[str | bytes],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> WebhookMessage:
    """Check a webhook delivery and return it decoded.

    ``body`` must be the raw request body exactly as received (not re-serialized
    JSON). ``headers`` is any mapping (names are matched case-insensitively) or
    a list of ``(name, value)`` pairs. ``secret`` is the ``whsec_…`` string
    (or raw key bytes), or several of them while rotating secrets.

    Raises :class:`~editfarm_client.errors.WebhookVerificationError` when a
    header is missing, the timestamp is more than ``tolerance_s`` away from
    ``now`` (default: the current time), no ``v1`` signature matches (compared
    in constant time), or the body is not a JSON object. Raises ValueError for a
    malformed secret.

    Example (any web framework)::

        message = verify_webhook(request_body, request_headers, os.environ["EDITFARM_WEBHOOK_SECRET"])
        if message.type == "job.succeeded":
            print(message.job.outputs[0].url)
    """
    secrets = [secret] if isinstance(secret, (str, bytes, bytearray)) else list(secret)
    if not secrets:
        raise ValueError("at least one webhook secret is required")
    keys = [_secret_key(s) for s in secrets]
    raw = body.encode() if isinstance(body, str) else bytes(body)

    msg_id = _header(headers, "webhook-id")
    msg_ts = _header(headers, "webhook-timestamp")
    msg_sig = _header(headers, "webhook-signature")
    if not msg_id or not msg_ts or not msg_sig:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(msg_ts.strip())
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("message timestamp too old")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("message timestamp too new")

    to_sign = f"{msg_id}.{timestamp}.".encode() + raw
    expected = [hmac.new(key, to_sign, hashlib.sha256).digest() for key in keys]
    matched = False
    for versioned in msg_sig.split():
        version, _, signature = versioned.partition(",")
        if version != "v1" or not signature:
            continue
        try:
            candidate = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            continue
        for digest in expected:  # no early exit: every comparison runs
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise WebhookVerificationError("no matching signature found")

    try:
        payload: Any = json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("body is not a JSON object")
    data = payload.get("data")
    job = Job.from_dict(data) if isinstance(data, Mapping) and "id" in data and "status" in data else None
    return WebhookMessage(
        id=msg_id,
        timestamp=dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc),
        type=str(payload.get("type") or ""),
        job=job,
        payload=payload,
    )
