"""A bench-only PROTOTYPE of the duty-cycle fix proposed for ``workers/runner.py`` (see bench/README.md).

Not production code: it measures what the proposal would give, on the runner as it is
today, by subclassing it. ``bench.duty_cycle --runner pipelined`` selects it (through
``bench.timed_worker``, ``EDITFARM_BENCH_RUNNER=pipelined``). Two changes:

1. **Finish in the background.** When the render returns, encode + upload + the terminal
   transition of the job run on one background thread (the "finisher") while the task
   returns at once: Celery acks, takes the next message, and the next job renders while the
   last one's output is encoded and uploaded. When another job is queued, the finish waits
   (at most 0.25 s) for the next render to start, and its thread runs at nice +10, so the
   gap between renders does not compete with it for the CPU. The job's lease keeps beating until its
   finish is done; if the process dies meanwhile the lease lapses and the reaper requeues
   the job, as for a death mid-render. At most one finish is pending: a second one waits
   for the first (back-pressure when encode + upload is slower than a render).
2. **Prefetch the next input.** When a render starts, a background thread looks at the head
   of the ``editfarm:queued:<priority>`` sorted sets (strict priority: high, normal, low),
   downloads that job's inputs and decodes them. If that job is the next one this worker
   gets, its inputs are taken from the cache instead of S3 (a hint: if another worker takes
   it, one download was wasted; the cache holds one job).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import workers.runner as runner_module
from broker import keys
from broker.schema import ErrorCode, Job, JobStatus, queue_deadline_at
from storage import ObjectNotFound, StorageUnavailable
from workers import operations
from workers.encode import UnreadableImage
from workers.pipeline.base import InvalidRequest, RenderInterrupted
from workers.runner import RetryLater, Runner

log = logging.getLogger("editfarm.bench.pipelined")


class Finisher:
    """One background thread: the finish (encode, upload, terminal transition) of the last job.

    When another job is queued, a finish first waits (at most ``hold_s``) until the next job's
    render has started, so that the gap between two renders (Celery's ack and next message, the
    next job's lease) runs without competing for the CPU; the finish then overlaps the render.
    The thread also runs at a lower CPU priority (nice +10) than the render.
    """

    def __init__(self, hold_s: float = 0.25) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="finisher", initializer=_lower_priority)
        self._pending: Future[Any] | None = None
        self.next_render = threading.Event()
        self.hold_s = hold_s

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, fn: Any, next_job_queued: bool) -> None:
        self.wait()
        self.next_render.clear()

        def run() -> None:
            if next_job_queued:
                self.next_render.wait(self.hold_s)
            fn()

        self._pending = self._pool.submit(run)


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # this thread only (Linux)
    except (AttributeError, OSError):
        pass


class Prefetcher:
    """Downloads and decodes the inputs of the job at the head of the queue, one job at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._lock = threading.Lock()
        self._cache: tuple[str, tuple[str, ...], dict[str, tuple[bytes, Any]]] | None = None
        self.hits = self.misses = 0
        self.next_job_queued = False  # whether the last look at the queue found a job

    def start(self, runner: Runner, current: str) -> None:
        self._pool.submit(self._fetch_head, runner, current)

    def _fetch_head(self, runner: Runner, current: str) -> None:
        self.next_job_queued = False
        try:
            client = runner.store.redis  # type: ignore[attr-defined]
            head = None
            for key in keys.QUEUED_ALL:
                ids = [i.decode() if isinstance(i, bytes) else str(i) for i in client.zrange(key, 0, 1)]
                ids = [i for i in ids if i != current]
                if ids:
                    head = ids[0]
                    break
            self.next_job_queued = head is not None
            if head is None:
                return
            with self._lock:
                if self._cache is not None and self._cache[0] == head:
                    return
            job = runner.store.get(head)
            if job is None or job.status is not JobStatus.QUEUED:
                return
            mask_key: str | None = getattr(job, "mask_key", None)
            inputs: list[str] = [*job.input_keys, *([mask_key] if mask_key else [])]
            fetched = {}
            for key in inputs:
                data = runner.objects.get(key)
                decoded = (runner_module.decode_mask if key == mask_key else _ORIGINAL_DECODE)(data)
                fetched[key] = (data, decoded)
            with self._lock:
                self._cache = (head, tuple(inputs), fetched)
        except Exception:
            log.debug("prefetch failed", exc_info=True)

    def take(self, job: Job) -> dict[str, tuple[bytes, Any]] | None:
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None and cache[0] == job.id:
            self.hits += 1
            return cache[2]
        self.misses += 1
        return None


_ORIGINAL_DECODE = runner_module.decode_image
_DECODED: dict[int, tuple[bytes, Any]] = {}


def _decode_image(data: bytes) -> Any:
    hit = _DECODED.pop(id(data), None)
    if hit is not None and hit[0] is data:
        return hit[1].copy()
    return _ORIGINAL_DECODE(data)


runner_module.decode_image = _decode_image  # the prototype's seam: decoded inputs from the prefetch

_STATE: dict[int, tuple[Finisher, Prefetcher]] = {}


def state() -> tuple[Finisher, Prefetcher]:
    """This process's finisher and prefetcher (made after fork)."""
    pid = os.getpid()
    if pid not in _STATE:
        _STATE[pid] = (Finisher(), Prefetcher())
    return _STATE[pid]


class _PrefetchedObjects:
    """The runner's object store, answering ``get`` for prefetched keys from memory."""

    def __init__(self, objects: Any, fetched: dict[str, tuple[bytes, Any]]) -> None:
        self._objects, self._fetched = objects, fetched

    def get(self, key: str) -> bytes:
        hit = self._fetched.get(key)
        if hit is None:
            return bytes(self._objects.get(key))
        _DECODED[id(hit[0])] = hit
        return hit[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._objects, name)


def _log_task(entered: float, job_id: str, kind: str) -> None:
    """Append the task's entry and return times (epoch s) to $EDITFARM_BENCH_RENDER_LOG/<pid>.tasks.jsonl."""
    folder = os.environ.get("EDITFARM_BENCH_RENDER_LOG")
    if folder:
        with open(os.path.join(folder, f"{os.getpid()}.tasks.jsonl"), "a") as f:
            f.write(json.dumps({"job": job_id, "runner": kind, "entered": entered, "returned": time.time()}) + "\n")


class TimedRunner(Runner):
    """The runner as it is, with each task's entry and return times logged (bench instrumentation)."""

    def run(self, job_id: str) -> JobStatus | None:
        entered = time.time()
        try:
            return super().run(job_id)
        finally:
            _log_task(entered, job_id, "current")


class PipelinedRunner(Runner):
    def run(self, job_id: str) -> JobStatus | None:
        entered = time.time()
        try:
            return self._run(job_id)
        finally:
            _log_task(entered, job_id, "pipelined")

    def _run(self, job_id: str) -> JobStatus | None:
        job = self.store.get(job_id)
        if job is None:
            return None
        if job.status.is_terminal:
            return job.status
        deadline = queue_deadline_at(job)
        if job.status is JobStatus.QUEUED and deadline is not None and time.time() > deadline:
            return self.expired(job)
        lease = self.started(job)
        if lease is None:
            current = self.store.get(job_id)
            return current.status if current else None
        lease.__enter__()
        handed_off = False
        try:
            job = self.store.get(job_id) or job
            status, finish = self._render(job, lease)
            if finish is not None:
                finisher, prefetcher = state()
                finisher.submit(finish, prefetcher.next_job_queued)
                handed_off = True
            return status
        finally:
            if not handed_off:
                lease.__exit__(None, None, None)

    def _render(self, job: Job, lease: Any) -> tuple[JobStatus | None, Any]:
        assert self.renderer is not None
        finisher, prefetcher = state()
        try:
            fetched = prefetcher.take(job)
            objects = self.objects
            if fetched is not None:
                self.objects = _PrefetchedObjects(objects, fetched)  # type: ignore[assignment]
            try:
                request = self._request(job)
            finally:
                self.objects = objects
            total = getattr(runner_module, "_planned_steps", operations.planned_steps)(request)
            if total != job.params.steps:
                self.store.compare_and_set(job.id, lease.expect(), {"progress": {"step": 0, "total": total}})
            prefetcher.start(self, job.id)
            finisher.next_render.set()  # the last job's finish may run now
            began = time.monotonic()
            previews = getattr(self, "_previews", None)  # latent previews, where the runner has them
            with previews(job) if previews is not None else contextlib.nullcontext():
                images = self.renderer.render(request, self._progress(job, lease))
            self.observe("render", time.monotonic() - began)
        except (UnreadableImage, ObjectNotFound, IndexError) as exc:
            return self.failed(job, lease, ErrorCode.INPUT_UNREADABLE, str(exc)), None
        except InvalidRequest as exc:
            return self.failed(job, lease, ErrorCode.INVALID_INPUT, str(exc)[:500]), None
        except RenderInterrupted:
            return self._interrupted(job, lease), None
        except StorageUnavailable as exc:
            self.handed_back(job, lease, str(exc))
            raise RetryLater(self.config.transient_retry_s, str(exc)) from exc
        except getattr(runner_module, "STORE_ERRORS", ()):
            raise  # as the runner does: the lease lapses and the reaper re-sends the job
        except Exception as exc:  # noqa: BLE001
            return self._render_error(job, lease, exc), None

        def finish() -> None:
            try:
                began = time.monotonic()
                outputs = self._upload(job, images)
                self.observe("upload", time.monotonic() - began)
                self.succeeded(job, lease, outputs, total)
            except StorageUnavailable as exc:
                if self.handed_back(job, lease, str(exc)):
                    self.requeue(job)
            except Exception as exc:
                log.exception("job %s failed while finishing", job.id)
                self.failed(job, lease, ErrorCode.UPLOAD_FAILED, f"{type(exc).__name__}: {exc}"[:500])
            finally:
                lease.__exit__(None, None, None)

        return JobStatus.RUNNING, finish
