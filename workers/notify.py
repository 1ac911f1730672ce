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
Enqueue = Callable[[str], None]

PROGRESS_TIMEOUT_S = 3.0


class WebhookNotifier:
    """Creates a job's webhook message for an event and queues its delivery."""

    def __init__(self, outbox: BaseWebhookOutbox, presign: Presign, enqueue: Enqueue,
                 config: WebhookConfig, client: httpx.Client, base_url: str = "",
                 link: Callable[[str, str], None] | None = None) -> None:
        self.outbox, self.presign, self.enqueue = outbox, presign, enqueue
        self.config, self.client, self.base_url = config, client, base_url
        # link(job_id, message_id): remembers a job's messages for its delivery log
        self.link = link or (lambda job_id, message_id: None)

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
        if not self.outbox.put(message_id, job.params.webhook, body, job.tenant):
            log.info("webhook %s already stored; queuing delivery again is harmless", message_id)
        self.link(job.id, message_id)
        # delivery dedupes on the message's state, so a second enqueue never sends twice
        self.enqueue(message_id)

    def send_progress(self, job: Job) -> None:
        """One POST, no retries: progress is advisory and the next one supersedes it."""
        url = job.params.webhook or ""
        try:
            check_url(url, allow_http=self.config.allow_http, allow_private=self.config.allow_private)
            message_id = f"msg_{job.id}_progress_{job.progress.step}_{secrets.token_hex(4)}"
            body = build_body("job.progress", {"id": job.id, "status": job.status.value,
                                               "progress": job.progress.model_dump()}, time.time())
            self.client.post(url, content=body, timeout=PROGRESS_TIMEOUT_S,
                             headers=signed_headers(self.config.secrets, message_id, body, int(time.time())))
        except (UrlNotAllowed, httpx.HTTPError, ValueError) as exc:
            log.info("progress webhook of %s not delivered: %s", job.id, type(exc).__name__)


