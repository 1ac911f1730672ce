"""The runner: owns a job's state machine on a worker.

load job → start (take the lease) → fetch input → render → encode → upload →
succeeded | failed | canceled. Each transition is a compare-and-set in the
JobStore, and each transition method below is the one place its side effects
(events, webhooks) happen — the cog way. While a job runs, a heartbeat thread
renews its lease; a second delivery of the same job (Celery redelivers unacked
messages after ``visibility_timeout``, or when a worker dies) sees a live lease
and backs off instead of running the job twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from broker import events, keys
from broker.events import EventPublisher
from broker.schema import ErrorCode, Job, JobError, JobStatus, Output, Progress
from broker.store import JobStore
from storage import ObjectNotFound, ObjectStore, StorageUnavailable
from workers.encode import UnreadableImage, decode_rgb, encode
from workers.pipeline.base import RenderInterrupted, Renderer, RenderRequest

log = logging.getLogger("editfarm.runner")

Notify = Callable[[Job], None]
"""Called once with a job that has just reached a terminal status (enqueues its webhook)."""


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


class _Lease:
    """This run's claim on a job: renewed by a heartbeat thread until released."""

    def __init__(self, store: JobStore, job_id: str, token: str, config: RunnerConfig) -> None:
        self.store, self.job_id, self.token, self.config = store, job_id, token, config
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def expect(self) -> dict[str, list[object]]:
        return {"status": [JobStatus.RUNNING.value], "worker": [self.token]}

    def _beat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval_s):
            try:
                renewed = self.store.compare_and_set(
                    self.job_id, self.expect(), {"lease_until": time.time() + self.config.lease_s})
            except Exception:  # noqa: BLE001 - Redis blip: keep the render going, try again next beat
                log.warning("lease renewal for %s failed; will retry", self.job_id)
                continue
            if not renewed:  # canceled, or taken over after we stalled past the lease
                self.lost.set()
                return

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Runner:
    def __init__(self, store: JobStore, objects: ObjectStore, publisher: EventPublisher,
                 renderer: Renderer, notify: Notify, config: RunnerConfig) -> None:
        self.store, self.objects, self.publisher = store, objects, publisher
        self.renderer, self.notify, self.config = renderer, notify, config

    # -- entry point -------------------------------------------------------------------------

    def run(self, job_id: str) -> JobStatus | None:
        """Run one delivery of a job; returns the status it ended in (None if not ours to run).

        Raises RetryLater when the job must be delivered again later.
        """
        job = self.store.get(job_id)
        if job is None:
            log.warning("job %s is unknown; dropping its message", job_id)
            return None
        if job.status.is_terminal:
            log.info("job %s already %s; duplicate delivery dropped", job_id, job.status.value)
            return job.status
        lease = self.started(job)
        if lease is None:
            current = self.store.get(job_id)
            return current.status if current else None
        with lease:
            return self._work(self.store.get(job_id) or job, lease)

    def _work(self, job: Job, lease: _Lease) -> JobStatus | None:
        try:
            image = decode_rgb(self.objects.get(job.input_keys[0]))
            images = self.renderer.render(self._request(job, image), self._progress(job, lease))
            outputs = self._upload(job, images)
        except (UnreadableImage, ObjectNotFound, IndexError) as exc:
            return self.failed(job, lease, ErrorCode.INPUT_UNREADABLE, str(exc))
        except RenderInterrupted:
            return self.canceled(job, lease, "canceled while rendering")
        except StorageUnavailable as exc:
            self.handed_back(job, lease, str(exc))
            raise RetryLater(self.config.transient_retry_s, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - any render failure ends the job, never the worker
            log.exception("job %s failed while rendering", job.id)
            return self.failed(job, lease, ErrorCode.RENDER_FAILED, f"{type(exc).__name__}: {exc}"[:500])
        return self.succeeded(job, lease, outputs)

    # -- transitions: the one place each side effect happens -----------------------------------

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
            if job.attempts >= self.config.max_attempts:
                self._terminal(job, JobStatus.FAILED, expect, error=JobError(
                    code="worker_lost", message=f"the job's worker died {job.attempts} times"))
                return None
        fields = {"worker": token, "lease_until": now + self.config.lease_s, "started_at": now,
                  "attempts": job.attempts + 1, "progress": Progress(total=job.params.steps).model_dump()}
        moved = self.store.transition(job.id, JobStatus.RUNNING, fields,
                                      from_=[job.status], expect=expect)
        if moved is None:
            log.info("job %s was not started here (changed meanwhile)", job.id)
            return None
        self.publisher.publish(job.id, events.STATUS, {"status": "running", "attempt": moved.attempts})
        return _Lease(self.store, job.id, token, self.config)

    def succeeded(self, job: Job, lease: _Lease, outputs: list[Output]) -> JobStatus | None:
        total = job.params.steps
        return self._terminal(job, JobStatus.SUCCEEDED, lease.expect(), outputs=outputs,
                              progress=Progress(step=total, total=total))

    def failed(self, job: Job, lease: _Lease, code: ErrorCode | str, message: str) -> JobStatus | None:
        code_value = code.value if isinstance(code, ErrorCode) else code
        return self._terminal(job, JobStatus.FAILED, lease.expect(),
                              error=JobError(code=code_value, message=message))

    def canceled(self, job: Job, lease: _Lease, reason: str) -> JobStatus | None:
        if lease.lost.is_set():  # someone else (a cancel request) already ended it
            current = self.store.get(job.id)
            return current.status if current else None
        return self._terminal(job, JobStatus.CANCELED, lease.expect(),
                              error=JobError(code="canceled", message=reason))

    def handed_back(self, job: Job, lease: _Lease, reason: str) -> None:
        """running → queued: a transient failure; the job will be delivered again."""
        moved = self.store.transition(job.id, JobStatus.QUEUED, {"worker": None, "lease_until": None},
                                      from_=[JobStatus.RUNNING], expect={"worker": [lease.token]})
        if moved is not None:
            log.warning("job %s handed back for retry: %s", job.id, reason)
            self.publisher.publish(job.id, events.STATUS, {"status": "queued", "reason": reason})

    def _terminal(self, job: Job, status: JobStatus, expect: dict[str, list[object]],
                  error: JobError | None = None, outputs: list[Output] | None = None,
                  progress: Progress | None = None) -> JobStatus | None:
        fields: dict[str, object] = {"finished_at": time.time(), "lease_until": None,
                                     "error": error.model_dump() if error else None}
        if outputs is not None:
            fields["outputs"] = [o.model_dump() for o in outputs]
        if progress is not None:
            fields["progress"] = progress.model_dump()
        moved = self.store.transition(job.id, status, fields, expect=expect)
        if moved is None:
            current = self.store.get(job.id)
            log.info("job %s not moved to %s (now %s)", job.id, status.value,
                     current.status.value if current else "gone")
            return current.status if current else None
        self.publisher.publish(job.id, events.STATUS, {"status": status.value,
                                                        "error": fields["error"]})
        self.notify(moved)
        return status

    # -- steps ---------------------------------------------------------------------------------

    def _request(self, job: Job, image: object) -> RenderRequest:
        p = job.params
        return RenderRequest(operation=p.operation.value, prompt=p.prompt, negative_prompt=p.negative_prompt,
                             steps=p.steps, true_cfg_scale=p.true_cfg_scale, seed=p.seed,
                             images=[image])  # type: ignore[list-item]

    def _progress(self, job: Job, lease: _Lease) -> Callable[[int, int], bool]:
        def on_step(step: int, total: int) -> bool:
            if lease.lost.is_set():
                return False
            kept = self.store.compare_and_set(job.id, lease.expect(),
                                              {"progress": {"step": step, "total": total}})
            if not kept:
                lease.lost.set()
                return False
            self.publisher.publish(job.id, events.PROGRESS, {"step": step, "total": total})
            return True
        return on_step

    def _upload(self, job: Job, images: list) -> list[Output]:  # type: ignore[type-arg]
        fmt = job.params.output_format
        outputs = []
        for index, image in enumerate(images):
            data = encode(image, fmt)
            key = keys.output_object(job.tenant, job.id, index, fmt.value)
            stored = self.objects.put(key, data, fmt.content_type)
            outputs.append(Output(key=key, content_type=fmt.content_type, width=image.width,
                                  height=image.height, sha256=stored.sha256, size_bytes=stored.size_bytes))
        return outputs
