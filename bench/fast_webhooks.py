"""A bench-only PROTOTYPE of the webhook change proposed for ``workers/`` (see bench/README.md).

``celery -A bench.fast_webhooks:app worker -Q webhooks``: the webhook worker as it is, except
that the ``editfarm.notify`` task makes the FIRST delivery attempt of the message it has just
stored itself, instead of queueing an ``editfarm.webhook`` task for it (one Celery hop
less between a job's end and its webhook). Only a delivery that must be retried is queued,
with its countdown, exactly as the webhook task would have queued it; the outbox (message,
lock, attempts) is the same, so nothing is ever sent twice.
"""

from __future__ import annotations

from broker.celery_app import enqueue_webhook
from workers import celery_worker, metrics, services
from workers.webhooks import deliver_once

app = celery_worker.app

_make_notifier = services.notifier


def _notifier():  # type: ignore[no-untyped-def]
    notifier = _make_notifier()

    def deliver_now(message_id: str) -> None:
        result = deliver_once(services.outbox(), message_id, services.webhook_config(), services.http_client())
        metrics.WEBHOOKS.labels(outcome=result.outcome).inc()
        if result.outcome == "retry":
            enqueue_webhook(services.celery_app(), message_id, countdown_s=result.retry_in_s or 0)

    notifier.enqueue = deliver_now
    return notifier


services.notifier = _notifier  # type: ignore[assignment]
