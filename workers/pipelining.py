"""Keep the device busy between jobs: finish the last job and fetch the next one's inputs in the background.

Without this, a worker's device idles while it encodes and uploads the last output, moves
the job to its terminal state, and downloads and decodes the next job's inputs (hundreds of
milliseconds per job at 1024²: see bench/duty_cycle.py). Two helpers, one of each per worker
process (made after fork, see :func:`for_this_process`):

* :class:`Finisher` — one background thread that runs a job's *finish* (encode, upload,
  terminal transition) while the task returns at once, so Celery acks and the next job's
  render starts. The job's lease keeps beating until its finish is done: a process that dies
  meanwhile leaves a lapsed lease, which the reaper re-sends like a death mid-render. At most
  one finish is pending; a second waits for the first (back-pressure when encode + upload is
  slower than a render). When another job is queued, a finish first waits (at most
  ``hold_s``) for the next render to start, and the thread runs at nice +10, so the short
  work between two renders never competes with it for the CPU.
* :class:`Prefetcher` — while a job renders, downloads and decodes the inputs of the job
  first in the queue (``JobStore.next_queued``). A hint: if that job is the next this worker
  runs, its inputs come from memory; if another worker takes it, one download was wasted.
  It holds one job's inputs at a time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from broker.schema import Job, JobStatus
from broker.store import JobStore
from storage import ObjectStore

log = logging.getLogger("editfarm.pipelining")

Decode = Callable[[bytes], Any]


def _lower_priority() -> None:
    """Run this thread at nice +10 (Linux threads have their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


class Finisher:
    """Runs one job's finish at a time on a background thread."""

    def __init__(self, hold_s: float = 0.25) -> None:
        self.hold_s = hold_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="finisher", initializer=_lower_priority)
        self._pending: Future[None] | None = None
        self._next_render = threading.Event()

    def submit(self, finish: Callable[[], None], next_job_queued: bool) -> None:
        """Run ``finish`` in the background, after the pending one (waited for here).

        ``next_job_queued``: hold the finish until :meth:`render_started` (at most ``hold_s``).
        """
        self.wait()
        self._next_render.clear()

        def run() -> None:
            if next_job_queued:
                self._next_render.wait(self.hold_s)
            finish()

        self._pending = self._pool.submit(run)

    def render_started(self) -> None:
        """The next job's render is starting: a held finish may run now."""
        self._next_render.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the pending finish; False if it is still running after ``timeout_s``.

        A finish never raises here: it sorts its own errors (see ``Runner._finish_in_background``).
        """
        pending = self._pending
        if pending is None:
            return True
        self._next_render.set()  # nothing else will start: don't hold it
        try:
            pending.result(timeout=timeout_s)
        except TimeoutError:
            return False
        except Exception:  # a finish sorts and logs its own errors; this is only in case
            log.exception("a background finish raised")
        self._pending = None
        return True

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()


class Prefetcher:
    """Downloads and decodes the inputs of the job first in the queue, one job at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._lock = threading.Lock()
        self._cache: tuple[str, dict[str, Any]] | None = None  # (job id, {object key: decoded})
        self._pending: Future[None] | None = None
        self.next_job_queued = False  # whether the last look at the queue found another job
        self.hits = self.misses = 0

    def start(self, store: JobStore, objects: ObjectStore, current: str,
              decode_image: Decode, decode_mask: Decode) -> Future[None]:
        """Look at the queue's head (other than ``current``) and fetch its inputs, in the background."""
        self._pending = self._pool.submit(self._fetch_head, store, objects, current, decode_image, decode_mask)
        return self._pending

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait for the fetch started last (it never raises)."""
        if self._pending is not None:
            self._pending.result(timeout=timeout_s)

    def _fetch_head(self, store: JobStore, objects: ObjectStore, current: str,
                    decode_image: Decode, decode_mask: Decode) -> None:
        try:
            head = store.next_queued(exclude=current)
            self.next_job_queued = head is not None
            if head is None:
                return
            with self._lock:
                if self._cache is not None and self._cache[0] == head:
                    return
            job = store.get(head)
            if job is None or job.status is not JobStatus.QUEUED:
                return
            fetched = {key: decode_image(objects.get(key)) for key in job.input_keys}
            if job.mask_key:
                fetched[job.mask_key] = decode_mask(objects.get(job.mask_key))
            with self._lock:
                self._cache = (head, fetched)
        except Exception:
            log.debug("prefetch of the next job's inputs failed", exc_info=True)

    def take(self, job: Job) -> dict[str, Any]:
        """The decoded inputs prefetched for ``job`` ({} if none); the cache is emptied either way."""
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None and cache[0] == job.id:
            self.hits += 1
            return cache[1]
        self.misses += 1
        return {}


class Pipelining:
    """A worker process's finisher and prefetcher."""

    def __init__(self, finish_in_background: bool = True, prefetch_inputs: bool = True,
                 finish_hold_s: float = 0.25) -> None:
        self.finisher = Finisher(finish_hold_s) if finish_in_background else None
        self.prefetcher = Prefetcher() if prefetch_inputs else None

    def next_job_queued(self) -> bool:
        return self.prefetcher is not None and self.prefetcher.next_job_queued

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait for the pending finish (at process shutdown); False if it did not end in ``timeout_s``."""
        return self.finisher.wait(timeout_s) if self.finisher is not None else True


_PER_PROCESS: dict[int, Pipelining] = {}


def for_this_process(make: Callable[[], Pipelining]) -> Pipelining:
    """This process's Pipelining, made on first use: threads do not survive fork, so one per pid."""
    pid = os.getpid()
    if pid not in _PER_PROCESS:
        _PER_PROCESS[pid] = make()
    return _PER_PROCESS[pid]
