"""Terminal-job notification: turn a finished job into a stored, signed-later webhook message.

The GPU worker only writes the message and enqueues its delivery on the CPU
``webhooks`` queue; it never waits on a slow receiver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from broker.schema import Job
from broker.views import job_view
from workers.webhooks import WebhookOutbox, build_body, message_id_for

log = logging.getLogger("editfarm.notify")

Presign = Callable[[str], str]
Enqueue = Callable[[str], None]


class WebhookNotifier:
    """Creates the one terminal webhook message of a job and queues its delivery."""

    def __init__(self, outbox: WebhookOutbox, presign: Presign, enqueue: Enqueue, base_url: str = "") -> None:
        self.outbox, self.presign, self.enqueue, self.base_url = outbox, presign, enqueue, base_url

    def __call__(self, job: Job) -> None:
        if not job.params.webhook:
            return
        event_type = f"job.{job.status.value}"
        message_id = message_id_for(job.id, event_type)
        body = build_body(event_type, job_view(job, self.presign, self.base_url), time.time())
        if not self.outbox.put(message_id, job.params.webhook, body, job.tenant):
            log.info("webhook %s already stored; queuing delivery again is harmless", message_id)
        # delivery dedupes on the message's state, so a second enqueue never sends twice
        self.enqueue(message_id)
