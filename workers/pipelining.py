"""Keep the device busy between jobs: take the next job while the current one renders, finish it after.

Run one after the other, a worker's device idles between two renders while the last output
is encoded and uploaded and its job moved to its terminal state, while Celery acks the
message and hands the next one to the pool child, and while the next job is leased and its
inputs downloaded and decoded: hundreds of milliseconds per job at 1024² (bench/duty_cycle.py).
Two helpers, one of each per worker process (made after fork, by ``workers.services.WorkerServices``):

* :class:`RenderLane` — one thread that renders. A render task fetches and decodes its job's
  inputs, hands the job to the lane and returns once its render is *nearly done* (within
  ``lane_lead_s``, estimated from its steps): Celery acks and hands the pool child the next
  message while the device is still busy, and that task fetches its job's inputs and waits for
  the lane. (Taking the next job only near the end keeps a busy worker from holding a job for
  long while another worker is free.) The waiting job stays ``queued`` (a cancel simply
  wins; its message is not acked) and is started, leased and rendered the moment the device
  is free, so the device goes from one render to the next with only that transition between.
  A rendering job's lease beats; a process that dies leaves it to lapse and the reaper
  re-sends the job (as for any death mid-render).
* :class:`Finisher` — one background thread that runs a rendered job's *finish* (encode,
  upload, terminal transition) while the lane renders the next one, at nice +10 so it never
  delays the render thread. At most one finish is pending; a second waits for the first
  (back-pressure when encode + upload is slower than a render).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("editfarm.pipelining")

T = TypeVar("T")


def _lower_priority() -> None:
    """Run this thread at nice +10 (Linux threads have their own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


def _wait(pending: Future[Any] | None, timeout_s: float | None) -> bool:
    """Wait for ``pending``; False if it still runs after ``timeout_s``. Never raises."""
    if pending is None:
        return True
    try:
        pending.result(timeout=timeout_s)
    except TimeoutError:
        return False
    except Exception:  # the work sorts and logs its own errors; this is only in case
        log.exception("background work raised")
    return True


class Finisher:
    """Runs one job's finish at a time on a background thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="finisher", initializer=_lower_priority)
        self._pending: Future[None] | None = None

    def submit(self, finish: Callable[[], None]) -> None:
        """Run ``finish`` in the background, after the pending one (waited for here)."""
        self.wait()
        self._pending = self._pool.submit(finish)

    def start(self) -> None:
        """Start the background thread (at warm-up) instead of on the first finish."""
        self._pool.submit(lambda: None).result()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the pending finish; False if it is still running after ``timeout_s``."""
        if not _wait(self._pending, timeout_s):
            return False
        self._pending = None
        return True


class RenderLane:
    """The one thread that renders; a job queues behind the rendering one."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="render")
        self._last: Future[Any] | None = None

    def run(self, render: Callable[[threading.Event], T], running: T) -> T:
        """Run ``render(ready)`` on the lane, after the render before it; return ``running`` once it
        set ``ready``, or what it returned (or raise what it raised) if it ended first.

        ``render`` sets ``ready`` when the next job may be taken (its render nearly done); after that
        it must sort its own errors.
        """
        ready = threading.Event()
        done = self._pool.submit(render, ready)
        self._last = done  # type: ignore[assignment]
        while not ready.wait(0.5):
            if done.done():
                break
        if ready.is_set():
            return running
        return done.result()

    def start(self) -> None:
        """Start the render thread (at warm-up) instead of on the first job."""
        self._pool.submit(lambda: None).result()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the last render handed to the lane; False if it still runs after ``timeout_s``."""
        return _wait(self._last, timeout_s)


class Pipelining:
    """A worker process's render lane and finisher (either may be off: one job at a time)."""

    def __init__(self, finish_in_background: bool = True, render_lane: bool = True) -> None:
        self.finisher = Finisher() if finish_in_background else None
        self.lane = RenderLane() if render_lane else None

    def start(self) -> None:
        """Start the threads now (at warm-up) rather than on the first job."""
        for pool in (self.lane, self.finisher):
            if pool is not None:
                pool.start()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait for the render in the lane, then the pending finish (at process shutdown).

        False if they did not end within ``timeout_s`` (each given the whole of it).
        """
        rendered = self.lane.wait(timeout_s) if self.lane is not None else True
        finished = self.finisher.wait(timeout_s) if self.finisher is not None else True
        return rendered and finished
