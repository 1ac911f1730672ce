"""The runner: owns a job's state machine on a worker.

load job → fetch input → start (take the lease) → render → encode → upload →
succeeded | failed | canceled (with a render lane and a finisher, workers/pipelining.py, the
fetch, the render and the encode + upload of consecutive jobs overlap). Each transition is a compare-and-set in the
JobStore, made by the runner's ``Transitions`` (workers/transitions.py), the one place its side
effects (events, webhooks) happen — the cog way. While a job runs, a heartbeat thread
renews its lease; a second delivery of the same job (Celery redelivers unacked
messages after ``visibility_timeout``, or when a worker dies) sees a live lease
and backs off instead of running the job twice.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from broker.jobstore import JobStore
from broker.schema import (
    ErrorCode,
    Job,
    JobStatus,
    Output,
    model_of,
    queue_deadline_at,
)
from storage import ObjectNotFound, ObjectStore, StorageUnavailable
from workers import failures, jobio
from workers.encode import UnreadableImage
from workers.lease import Lease as _Lease
from workers.loras import LoraResolver, LoraUnavailable
from workers.pipeline.base import (
    InvalidRequest,
    Previews,
    Renderer,
    RenderInterrupted,
    RenderRequest,
    UnsupportedOperation,
)
from workers.pipelining import Pipelining
from workers.progress import step_callback
from workers.render_queue import WorkQueue
from workers.transitions import RetryLater, RunnerConfig, Transitions

__all__ = ["EXIT_GPU_BROKEN", "DrainCheck", "GpuBroken", "RetryLater", "Runner", "RunnerConfig"]

log = logging.getLogger("editfarm.runner")

STORE_ERRORS = (redis.exceptions.RedisError,)

DrainCheck = Callable[[], bool]
"""True once this worker must hand back its running job (graceful shutdown window over)."""


def _planned_steps(request: RenderRequest) -> int:
    """The request's progress total (imported here: workers.operations needs numpy, which the slim
    CPU image of webhook workers, importing this module, does not have)."""
    from workers.operations import planned_steps

    return planned_steps(request)


EXIT_GPU_BROKEN = 70
"""The exit status of a worker process whose device failed its health check."""


class GpuBroken(Exception):
    """The device failed its health check after an error: this process must exit and be restarted."""


@dataclass(frozen=True)
class _Prepared:
    """A started job with its inputs ready, waiting for the device."""

    job: Job
    request: RenderRequest
    total: int


@dataclass(frozen=True)
class _Rendered:
    """A render's result, waiting for its finish (encode, upload, terminal transition)."""

    job: Job
    images: list[Any]
    total: int


class Runner:
    """Runs a job's deliveries: fetch inputs, render, encode and upload, through its transitions.

    Its collaborators are handed in, none inherited: ``transitions`` (each state change and its side
    effects, with the job store), ``objects`` (inputs, outputs, previews), ``renderer`` (the model),
    ``queue`` (re-send a handed-back job, give way to higher priorities, see what waits), ``loras``
    (a job's LoRA uris → local files; from the EDITFARM_ settings on first use if None),
    ``pipelining`` (render lane + background finisher; None: one job at a time, in order),
    ``draining`` (the shutdown window is over) and ``observe(metric, seconds)``. ``model``: the catalog model
    ``renderer`` holds; a job of another model is sent to its own model's queue, never rendered here
    (None: every job is this worker's, as in unit tests).
    """

    def __init__(self, *, transitions: Transitions, objects: ObjectStore, renderer: Renderer, queue: WorkQueue,
                 config: RunnerConfig, loras: LoraResolver | None = None, pipelining: Pipelining | None = None,
                 draining: DrainCheck | None = None,
                 observe: Callable[[str, float], None] | None = None, model: str | None = None) -> None:
        self.transitions, self.objects, self.renderer, self.queue = transitions, objects, renderer, queue
        self.model = model
        self.config, self.pipelining = config, pipelining
        self._loras = loras
        self.draining = draining or (lambda: False)
        self.observe = observe or (lambda name, value: None)

    @property
    def store(self) -> JobStore:
        """The transitions' job store (the runner reads jobs and writes progress through it)."""
        return self.transitions.store

    # -- entry point -------------------------------------------------------------------------

    def run(self, job_id: str) -> JobStatus | None:
        """Run one delivery of a job; returns the status it ended in (None if not ours to run).

        With a render lane this returns (``RUNNING``) once the job's render has started, and with
        a finisher once it has rendered: the rest happens in the background, under the job's lease.
        A job waits for the lane still queued (its inputs fetched): a cancel meanwhile simply wins.
        Raises RetryLater when the job must be delivered again later. While the job store is
        unreachable this waits for it (up to ``store_outage_wait_s``): the message stays unacked,
        so the job is neither lost nor run twice; then the store error is raised.
        """
        waited_s, delay_s = 0.0, 0.1
        while True:
            try:
                return self._run(job_id)
            except STORE_ERRORS:
                if waited_s >= self.config.store_outage_wait_s:
                    raise
                log.warning("job %s: job store unreachable; trying again in %.1f s", job_id, delay_s)
            time.sleep(delay_s)
            waited_s += delay_s
            delay_s = min(delay_s * 2, 2.0)

    def _run(self, job_id: str) -> JobStatus | None:
        job = self.store.get(job_id)
        if job is None:
            log.warning("job %s is unknown; dropping its message", job_id)
            return None
        if job.status.is_terminal:
            log.info("job %s already %s; duplicate delivery dropped", job_id, job.status.value)
            return job.status
        if self._past_queue_deadline(job):
            return self.transitions.expired(job)
        if self.model is not None and model_of(job) != self.model:
            return self._not_our_model(job)
        lane = self.pipelining.lane if self.pipelining is not None else None
        if lane is None:
            return self._start_and_render(job)
        # fetched now, while the device may still render the job before; errors are sorted once started
        early = self._fetch_early(job) if job.status is JobStatus.QUEUED else None
        running: JobStatus | None = JobStatus.RUNNING
        return lane.run(functools.partial(self._in_lane, job_id, early), running=running)

    def _not_our_model(self, job: Job) -> JobStatus | None:
        """A message of another model's job reached this worker (a queue it was pointed at by hand, a
        message pushed by an old version): rendering it would use the wrong weights. A queued job is sent
        to its own model's queue (a second message is harmless: the lease lets one delivery run it); a
        running one belongs to its lease holder."""
        log.warning("job %s is for model %s, this worker serves %s: sent to its own model's queue", job.id,
                    model_of(job), self.model)
        if job.status is JobStatus.QUEUED:
            self.queue.requeue(job)
            return JobStatus.QUEUED
        return None

    def _fetch_early(self, job: Job) -> RenderRequest | Exception:
        """The job's request, or the error building it raised (store errors propagate)."""
        try:
            return self._request(job)
        except STORE_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted by _prepare once the job is started
            return exc

    def _in_lane(self, job_id: str, request: RenderRequest | Exception | None,
                 ready: threading.Event) -> JobStatus | None:
        """On the render thread, once the device is free: start the job (it may have changed while it
        waited) and render it. Raises to the task's thread until ``ready``; never after."""
        job = self.store.get(job_id)
        if job is None or job.status.is_terminal:
            return job.status if job else None
        if self._past_queue_deadline(job):
            return self.transitions.expired(job)
        if job.status is JobStatus.QUEUED and self._gave_way(job):
            return JobStatus.QUEUED
        try:
            return self._start_and_render(job, request, ready)
        except GpuBroken:
            if not ready.is_set():
                raise
            # the job is already ended; this process's device is not trustworthy any more.
            # Exiting makes Celery start a fresh child (which reloads the model).
            log.critical("device broken; exiting so the worker restarts", exc_info=True)
            os._exit(EXIT_GPU_BROKEN)
        except Exception:
            if not ready.is_set():
                raise  # the task's thread sorts it (retry later, store errors)
            log.exception("job %s: left to its lease after an error on the render thread", job_id)
            return None

    @staticmethod
    def _past_queue_deadline(job: Job) -> bool:
        deadline = queue_deadline_at(job)
        return job.status is JobStatus.QUEUED and deadline is not None and time.time() > deadline

    def _jobs_waiting(self) -> bool:
        """Whether a render message waits (if none, returning early would only take CPU from the render)."""
        try:
            return self.queue.jobs_waiting()
        except STORE_ERRORS:
            return True

    def _gave_way(self, job: Job) -> bool:
        """Strict priority: a job taken while the device was busy yields to a higher one queued since."""
        try:
            if self.queue.give_way(job):
                log.info("job %s gave way to a job of higher priority", job.id)
                return True
        except STORE_ERRORS:  # can't tell: render it (priority is an order, not a guarantee)
            log.warning("job %s: could not look for jobs of higher priority", job.id)
        return False

    def _start_and_render(self, job: Job, request: RenderRequest | Exception | None = None,
                          ready: threading.Event | None = None) -> JobStatus | None:
        """queued → running, then prepare, render and finish (the finish maybe in the background)."""
        lease = self.transitions.started(job)
        if lease is None:
            return self.transitions.status_now(job.id)
        background = ready is not None
        owns_lease = True
        lease.__enter__()
        try:
            prepared = self._prepare(lease.job, lease, request)
            if not isinstance(prepared, _Prepared):
                return prepared
            rendered = self._render(prepared, lease, background, ready)
            if not isinstance(rendered, _Rendered):
                return rendered
            if self._finish_later(rendered, lease):
                owns_lease = False  # the finisher releases it once the job has ended
                return JobStatus.RUNNING
            return self._finish(rendered, lease, background)
        finally:
            if owns_lease:
                lease.release()

    def _prepare(self, job: Job, lease: _Lease,
                 early: RenderRequest | Exception | None = None) -> _Prepared | JobStatus | None:
        """The job's request (``early``: fetched before, or the error that raised), its errors sorted."""
        try:
            if isinstance(early, Exception):
                raise early
            request = early if early is not None else self._request(job)
            total = _planned_steps(request)
            if total != job.params.steps:
                self.store.compare_and_set(job.id, lease.expect(), {"progress": {"step": 0, "total": total}})
        except (UnreadableImage, ObjectNotFound, IndexError, LoraUnavailable) as exc:
            return self.transitions.failed(job, lease, ErrorCode.INPUT_UNREADABLE,
                               failures.for_tenant(job.id, ErrorCode.INPUT_UNREADABLE, exc))
        except InvalidRequest as exc:  # the job's inputs cannot be rendered as asked: not the device's fault
            return self.transitions.failed(job, lease, ErrorCode.INVALID_INPUT, failures.for_tenant(job.id, ErrorCode.INVALID_INPUT, exc))
        except StorageUnavailable as exc:
            return self._storage_down(job, lease, exc, background=False)
        except STORE_ERRORS:
            raise  # the store failed, not the job: the lease lapses and the reaper re-sends the job
        except Exception as exc:  # noqa: BLE001 - a job that can't be prepared ends, never the worker
            return self._render_error(job, lease, exc)
        return _Prepared(job, request, total)

    def _render(self, prepared: _Prepared, lease: _Lease, background: bool,
                ready: threading.Event | None = None) -> _Rendered | JobStatus | None:
        """Render on the device. ``ready`` is set once the render is within ``lane_lead_s`` of its end
        (estimated from its steps so far), or has ended: the worker may take its next job then.
        Raises GpuBroken, store errors."""
        job = prepared.job
        try:
            started = time.monotonic()
            on_step = step_callback(job=job, lease=lease, transitions=self.transitions, config=self.config,
                                    draining=self.draining, jobs_waiting=self._jobs_waiting, ready=ready)
            images = self.renderer.render(prepared.request, on_step, previews=self._previews(job))
            if ready is not None:
                ready.set()
            self.observe("render", time.monotonic() - started)
        except UnsupportedOperation as exc:  # routed to a model that does not serve it: no retry here
            code = ErrorCode.UNSUPPORTED_OPERATION
            return self.transitions.failed(job, lease, code, failures.for_tenant(job.id, code, exc))
        except InvalidRequest as exc:
            return self.transitions.failed(job, lease, ErrorCode.INVALID_INPUT, failures.for_tenant(job.id, ErrorCode.INVALID_INPUT, exc))
        except RenderInterrupted:
            return self._interrupted(job, lease)
        except StorageUnavailable as exc:
            return self._storage_down(job, lease, exc, background)
        except STORE_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - any render failure ends the job, never the worker
            return self._render_error(job, lease, exc)
        return _Rendered(job, list(images), prepared.total)

    def _finish_later(self, rendered: _Rendered, lease: _Lease) -> bool:
        """Hand the finish to the background finisher, if there is one (it then owns the lease)."""
        finisher = self.pipelining.finisher if self.pipelining is not None else None
        if finisher is None:
            return False
        finisher.submit(functools.partial(self._finish_in_background, rendered, lease))
        return True

    def _storage_down(self, job: Job, lease: _Lease, exc: StorageUnavailable, background: bool) -> JobStatus | None:
        """The object store is unreachable: hand the job back. Raises RetryLater on the task's thread;
        in the background (no Celery message to retry) the job is re-sent instead."""
        # the log line keeps the store's text; the tenant's status event gets a sentence (Transitions guards it)
        handed_back = self.transitions.handed_back(job, lease, str(exc))
        if not background:
            raise RetryLater(self.config.transient_retry_s, str(exc)) from exc
        if handed_back:
            self.queue.requeue(job)
        return self.transitions.status_now(job.id)

    def _finish(self, rendered: _Rendered, lease: _Lease, background: bool) -> JobStatus | None:
        """Encode and upload a rendered job's outputs, then succeeded (or failed / handed back).

        Raises RetryLater on the task's thread when the object store is down (see _storage_down);
        store (Redis) errors propagate: the lease lapses.
        """
        job = rendered.job
        try:
            began = time.monotonic()
            outputs = self._upload(job, rendered.images)
            self.observe("upload", time.monotonic() - began)
        except StorageUnavailable as exc:
            return self._storage_down(job, lease, exc, background)
        except STORE_ERRORS:
            raise
        except Exception:  # noqa: BLE001 - an output that can't be encoded or stored ends the job
            log.exception("job %s failed while encoding or uploading its outputs", job.id)
            return self.transitions.failed(job, lease, ErrorCode.UPLOAD_FAILED, failures.generic(ErrorCode.UPLOAD_FAILED))
        return self.transitions.succeeded(job, lease, outputs, rendered.total)

    def _finish_in_background(self, rendered: _Rendered, lease: _Lease) -> None:
        """The finisher thread's body: never raises (a finish that fails leaves its lease to lapse)."""
        try:
            self._finish(rendered, lease, background=True)
        except STORE_ERRORS:
            log.warning("job %s: job store unreachable while finishing; its lease will lapse and the "
                        "reaper re-sends it", rendered.job.id)
        except Exception:  # noqa: BLE001 - a background thread has no caller to raise to
            log.exception("job %s: finish failed", rendered.job.id)
        finally:
            lease.release()

    def _previews(self, job: Job) -> Previews | None:
        """What ``job``'s render previews: each stored and its key announced (None: previews are off)."""
        every = self.config.preview_every_n_steps
        if every <= 0:
            return None
        return Previews(every, jobio.preview_sink(job, self.objects, self.transitions.publisher))

    def _interrupted(self, job: Job, lease: _Lease) -> JobStatus | None:
        if lease.stop_reason == "timeout":
            return self.transitions.failed(job, lease, ErrorCode.TIMEOUT,
                               f"the job ran longer than its timeout_s={job.params.timeout_s:g}")
        if lease.stop_reason == "drain":
            if self.transitions.handed_back(job, lease, "worker shutting down"):
                self.queue.requeue(job)
            return self.transitions.status_now(job.id)
        return self.transitions.canceled(job, lease, "canceled while rendering")

    def _render_error(self, job: Job, lease: _Lease, exc: Exception) -> JobStatus | None:
        """Sort a render error: out of memory and others fail the job; a broken device ends the process."""
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
            status = self.transitions.failed(job, lease, ErrorCode.OUT_OF_MEMORY,
                                 "the device ran out of memory; try a smaller size or fewer images")
        else:
            log.exception("job %s failed while rendering", job.id)
            status = self.transitions.failed(job, lease, ErrorCode.RENDER_FAILED, failures.generic(ErrorCode.RENDER_FAILED))
        try:
            self.renderer.healthcheck()
        except Exception as broken:
            raise GpuBroken(f"device failed its health check after {type(exc).__name__}") from broken
        return status

    # -- steps ---------------------------------------------------------------------------------

    @property
    def loras(self) -> LoraResolver:
        if self._loras is None:
            self._loras = LoraResolver.from_settings(self.objects)
        return self._loras

    def _request(self, job: Job) -> RenderRequest:
        """The job's RenderRequest (see jobio.render_request for what it raises)."""
        return jobio.render_request(job, self.objects, self.loras)

    def _upload(self, job: Job, images: list[Any]) -> list[Output]:
        return jobio.upload_outputs(job, images, self.objects)
