"""A job's transitions on a worker: each is a compare-and-set in the JobStore and the one place its
side effects (events, webhooks, metrics) happen — the cog way. ``workers.runner.Runner`` drives them
and the reaper (``workers.reaper``) uses :meth:`Transitions.expired`; neither inherits them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from broker import events
from broker.events import EventPublisher
from broker.jobstore import JobStore
from broker.schema import ErrorCode, Job, JobError, JobStatus, Output, Progress
from broker.tenanttext import tenant_message
from workers.lease import Lease as _Lease

log = logging.getLogger("editfarm.runner")

Notify = Callable[[Job, str], None]
"""Called with a job and a webhook event ("job.started", "job.progress", "job.succeeded", ...)."""

def wants_event(job: Job, event: str) -> bool:
    """Whether ``job``'s webhook subscribed to ``event`` (terminal events always, if a webhook is set)."""
    if not job.params.webhook:
        return False
    if event in ("job.started", "job.progress"):
        return event.removeprefix("job.") in {e.value for e in job.params.webhook_events}
    return True


def _for_tenant(job_id: str, code: str, message: str) -> str:
    """``message`` if the job's tenant may read it; else the code's generic one (the raw text is logged)."""
    public = tenant_message(message, code)
    if public != message:
        log.warning("job %s (%s): message withheld from its tenant: %s", job_id, code, message)
    return public


class RetryLater(Exception):
    """The job can't run here now; deliver it again in ``delay_s`` seconds."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason


@dataclass(frozen=True)
class RunnerConfig:
    worker_name: str
    lease_s: float = 60.0
    heartbeat_interval_s: float = 10.0
    max_attempts: int = 3
    transient_retry_s: float = 5.0
    # with a render lane: take the next job once the render is within this long of its end (seconds).
    # Enough to fetch and decode the next job's inputs; short, so that a job is not held by a busy
    # worker while another one is free
    lane_lead_s: float = 1.0
    # a step's progress (and the lease check that goes with it) is written at most this often (s);
    # 0: every step. Fast steps then cost one Redis round trip per interval, not per step
    progress_interval_s: float = 0.0
    # how long a delivery waits for an unreachable job store (Redis restarting) before it gives up
    store_outage_wait_s: float = 120.0
    # progress webhooks are best effort and throttled to one per this many seconds
    progress_webhook_interval_s: float = 2.0
    # a small preview image every this many denoising steps (0: none); renderers that can't are skipped
    preview_every_n_steps: int = 0


TerminalMessage = Callable[[str, str], tuple[str, str]]
"""(job id, event) → (list, Celery notify message) to push with a terminal transition."""


class Transitions:
    """queued → running → succeeded | failed | canceled (or back to queued), for one worker."""

    def __init__(self, *, store: JobStore, publisher: EventPublisher, notify: Notify, config: RunnerConfig,
                 observe: Callable[[str, float], None] | None = None,
                 terminal_message: TerminalMessage | None = None) -> None:
        self.store, self.publisher, self.config = store, publisher, config
        self._notify = notify
        # observe(metric, seconds): "queue_wait", "render", "upload"; and ("job", status) counts
        self.observe = observe or (lambda name, value: None)
        # (job id, event) → (list, Celery notify message) pushed with a terminal transition; None:
        # terminal webhooks go through ``notify`` after the transition, like the others
        self.terminal_message = terminal_message

    def notify(self, job: Job, event: str) -> None:
        if wants_event(job, event):
            try:
                self._notify(job, event)
            except Exception:  # a started/progress webhook is best effort and must never fail the job
                log.exception("could not queue webhook %s of job %s", event, job.id)

    def started(self, job: Job) -> _Lease | None:
        """queued → running (or take over a running job whose lease lapsed). None if not taken."""
        now = time.time()
        token = f"{self.config.worker_name}/{uuid.uuid4().hex[:12]}"
        expect: dict[str, list[object]] = {"attempts": [job.attempts]}
        if job.status is JobStatus.RUNNING:
            if job.lease_until is not None and job.lease_until > now:
                # its first run may still be alive: come back when the lease would have lapsed
                raise RetryLater(job.lease_until - now + 0.5, "job is running elsewhere")
            expect.update(worker=[job.worker], lease_until=[job.lease_until])
            deaths = job.attempts - job.handbacks
            if deaths >= self.config.max_attempts:
                self._terminal(job, JobStatus.FAILED, expect, error=JobError(
                    code="worker_lost", message=f"the job's worker died {deaths} times"))
                return None
        fields = {"worker": token, "lease_until": now + self.config.lease_s, "started_at": now,
                  "attempts": job.attempts + 1, "progress": Progress(total=job.params.steps).model_dump()}
        moved = self.store.transition(job.id, JobStatus.RUNNING, fields,
                                      from_=[job.status], expect=expect)
        if moved is None:
            log.info("job %s was not started here (changed meanwhile)", job.id)
            return None
        log.info("job %s started (attempt %d)", job.id, moved.attempts)
        self.publisher.publish(job.id, events.STATUS, {"status": "running", "attempt": moved.attempts})
        self.observe("queue_wait", max(0.0, now - job.created_at))
        self.notify(moved, "job.started")
        return _Lease(self.store, moved, token, self.config)

    def expired(self, job: Job) -> JobStatus | None:
        """queued → canceled: the job was not started within its queue deadline."""
        return self._terminal(job, JobStatus.CANCELED, {"attempts": [job.attempts]}, error=JobError(
            code=ErrorCode.QUEUE_DEADLINE.value,
            message=f"not started within queue_deadline_s={job.params.queue_deadline_s:g}"))

    def succeeded(self, job: Job, lease: _Lease, outputs: list[Output],
                  total: int | None = None) -> JobStatus | None:
        """running → succeeded; ``total``: the job's denoising steps (``operations.planned_steps``)."""
        total = job.params.steps if total is None else total
        return self._terminal(job, JobStatus.SUCCEEDED, lease.expect(), outputs=outputs,
                              progress=Progress(step=total, total=total))

    def failed(self, job: Job, lease: _Lease, code: ErrorCode | str, message: str) -> JobStatus | None:
        code_value = code.value if isinstance(code, ErrorCode) else code
        return self._terminal(job, JobStatus.FAILED, lease.expect(),
                              error=JobError(code=code_value, message=_for_tenant(job.id, code_value, message)))

    def status_now(self, job_id: str) -> JobStatus | None:
        """The job's status as the store has it now (None if it is gone)."""
        current = self.store.get(job_id)
        return current.status if current else None

    def canceled(self, job: Job, lease: _Lease, reason: str) -> JobStatus | None:
        if lease.lost.is_set():  # someone else (a cancel request) already ended it
            return self.status_now(job.id)
        return self._terminal(job, JobStatus.CANCELED, lease.expect(),
                              error=JobError(code="canceled", message=reason))

    def handed_back(self, job: Job, lease: _Lease, reason: str) -> bool:
        """running → queued: a transient failure or a drain; the job will be delivered again."""
        moved = self.store.transition(job.id, JobStatus.QUEUED, {"worker": None, "lease_until": None,
                                                                 "handbacks": job.handbacks + 1},
                                      from_=[JobStatus.RUNNING], expect={"worker": [lease.token]})
        if moved is not None:
            log.warning("job %s handed back: %s", job.id, reason)
            self.publisher.publish(job.id, events.STATUS, {"status": "queued",
                                                            "reason": _for_tenant(job.id, "unavailable", reason)})
        return moved is not None

    def _terminal(self, job: Job, status: JobStatus, expect: dict[str, list[object]],
                  error: JobError | None = None, outputs: list[Output] | None = None,
                  progress: Progress | None = None) -> JobStatus | None:
        fields: dict[str, object] = {"finished_at": time.time(), "lease_until": None,
                                     "error": error.model_dump() if error else None}
        if outputs is not None:
            fields["outputs"] = [o.model_dump() for o in outputs]
        if progress is not None:
            fields["progress"] = progress.model_dump()
        event = f"job.{status.value}"
        # the webhook's notify message goes with the transition itself where the worker can build it:
        # a job never ends without its terminal webhook being asked for, whatever fails after
        push = (self.terminal_message(job.id, event)
                if self.terminal_message is not None and wants_event(job, event) else None)
        moved = self.store.transition(job.id, status, fields, expect=expect, push=push)
        if moved is None:
            now = self.status_now(job.id)
            log.info("job %s not moved to %s (now %s)", job.id, status.value, now.value if now else "gone")
            return now
        self.publisher.publish(job.id, events.STATUS, {"status": status.value,
                                                        "error": fields["error"]})
        self.observe(f"job.{status.value}", 1.0)
        if push is None:
            self.notify(moved, event)
        return status
