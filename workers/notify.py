"""Job notifications: turn a job event into a stored webhook message (or a best-effort POST).

Runs on CPU webhook workers (the ``editfarm.notify`` task); a GPU worker only
sends that small task and never waits on a receiver.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import httpx
import redis

from broker.schema import Job
from broker.urlpolicy import UrlNotAllowed, check_url
from broker.views import job_view
from workers.webhooks import (
    TERMINAL_EVENT_TYPES,
    BaseWebhookOutbox,
    WebhookConfig,
    build_body,
    message_id_for,
    signed_headers,
)

log = logging.getLogger("editfarm.notify")

Presign = Callable[[str], str]
Deliver = Callable[[str], None]
ConfigFor = Callable[[str], WebhookConfig]

PROGRESS_TIMEOUT_S = 3.0


class WebhookNotifier:
    """Stores a job's webhook message for an event and hands its id to ``deliver``.

    ``deliver(message_id)`` makes (or queues) the delivery; ``config_for(tenant)`` gives the
    tenant's delivery settings and signing secrets.
    """

    def __init__(self, outbox: BaseWebhookOutbox, presign: Presign, deliver: Deliver, config_for: ConfigFor,
                 client: httpx.Client, base_url: str = "") -> None:
        self.outbox, self.presign, self.deliver = outbox, presign, deliver
        self.config_for, self.client, self.base_url = config_for, client, base_url

    def __call__(self, job: Job, event: str) -> None:
        """Stored and retried for ``job.started`` and terminal events; best effort for ``job.progress``."""
        if not job.params.webhook:
            return
        if event == "job.progress":
            self.send_progress(job)
            return
        if event in TERMINAL_EVENT_TYPES and not job.status.is_terminal:
            log.warning("job %s: %s asked while %s; ignored", job.id, event, job.status.value)
            return
        message_id = message_id_for(job.id, event)
        body = build_body(event, job_view(job, self.presign, self.base_url), time.time())
        # job_id: the message goes into the job's delivery log in the same step
        if not self.outbox.put(message_id, job.params.webhook, body, job.tenant, job_id=job.id):
            log.info("webhook %s already stored; delivering again is harmless", message_id)
        # delivery dedupes on the message's state and lock, so a second run never sends twice
        self.deliver(message_id)

    def send_progress(self, job: Job) -> None:
        """One POST, no retries: progress is advisory and the next one supersedes it."""
        url = job.params.webhook or ""
        try:
            config = self.config_for(job.tenant)
            check_url(url, allow_http=config.allow_http, allow_private=config.allow_private)
            message_id = f"msg_{job.id}_progress_{job.progress.step}_{secrets.token_hex(4)}"
            body = build_body("job.progress", {"id": job.id, "status": job.status.value,
                                               "progress": job.progress.model_dump()}, time.time())
            self.client.post(url, content=body, timeout=PROGRESS_TIMEOUT_S,
                             headers=signed_headers(config.secrets, message_id, body, int(time.time())))
        except (UrlNotAllowed, httpx.HTTPError, redis.RedisError, ValueError) as exc:
            log.info("progress webhook of %s not delivered: %s", job.id, type(exc).__name__)
