"""A render's step callback: a job's progress recorded and announced, and the reasons to stop it.

The runner (``workers/runner.py``) hands one to each render; it never raises for an unreachable
job store (progress is advisory; the lease's heartbeat decides who owns the job).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from broker import events
from broker.schema import Job
from workers.lease import Lease
from workers.pipeline.base import StepCallback
from workers.transitions import RunnerConfig, Transitions

log = logging.getLogger("editfarm.runner")

STORE_ERRORS = (redis.exceptions.RedisError,)


def step_callback(*, job: Job, lease: Lease, transitions: Transitions, config: RunnerConfig,
                  draining: Callable[[], bool], jobs_waiting: Callable[[], bool],
                  ready: threading.Event | None = None) -> StepCallback:
    """``job``'s ``on_step``: it records progress (at most every ``progress_interval_s``), publishes
    it, sends throttled progress webhooks, stops the render (returns False) once the lease is lost,
    the job's timeout is over or the worker drains, and sets ``ready`` once the render is within
    ``lane_lead_s`` of its end while jobs wait (the worker may take the next one then).

    The store may be unreachable meanwhile: progress is advisory, the lease's heartbeat decides.
    """
    started = time.monotonic()
    last_webhook = [0.0]
    last_recorded = [0.0]

    def on_step(step: int, total: int) -> bool:
        keep_going = record(step, total)
        if keep_going and ready is not None and not ready.is_set() and step > 0:
            left_s = (time.monotonic() - started) / step * (total - step)
            if left_s <= config.lane_lead_s and jobs_waiting():  # take the next one now
                ready.set()
        return keep_going

    def record(step: int, total: int) -> bool:
        if job.params.timeout_s is not None and time.monotonic() - started > job.params.timeout_s:
            lease.stop("timeout")
        try:
            if draining():
                lease.stop("drain")
        except STORE_ERRORS:
            log.warning("job %s: drain check failed (job store unreachable)", job.id)
        if lease.lost.is_set():
            return False
        now = time.monotonic()
        if step < total and now - last_recorded[0] < config.progress_interval_s:
            return True  # recorded a moment ago; the heartbeat still watches the lease
        last_recorded[0] = now
        try:
            kept = transitions.store.compare_and_set(job.id, lease.expect(),
                                                     {"progress": {"step": step, "total": total}})
        except STORE_ERRORS:  # progress is advisory; the heartbeat's lease decides ownership
            log.warning("job %s: progress %d/%d not recorded (job store unreachable)", job.id, step, total)
            return True
        if not kept:
            lease.stop("lost")
            return False
        try:
            transitions.publisher.publish(job.id, events.PROGRESS, {"step": step, "total": total})
        except STORE_ERRORS:
            pass
        if step < total and now - last_webhook[0] >= config.progress_webhook_interval_s:
            last_webhook[0] = now
            transitions.notify(job, "job.progress")
        return True
    return on_step
