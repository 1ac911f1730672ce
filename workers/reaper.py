"""The reaper: finds jobs that nobody is working on any more and gets them moving.

- A running job whose lease lapsed (its worker died, or the whole worker pod
  went away and its Celery message waits out the visibility timeout) is sent
  to the render queue again; the runner then takes it over (attempts + 1).
- A queued job past its queue deadline is canceled (``queue_deadline``) even
  if no worker ever picks its message up.
- A queued job whose render message is nowhere (not in its model's lists, not held by any worker)
  for ``stranded_after_s`` gets a new one: a message taken from a Redis primary that died before its
  replica had the worker's bookkeeping. A second message is harmless (the lease lets one delivery
  run the job); the check reads the lists, so it runs every ``stranded_every_s`` only.

It runs as a thread in the CPU webhook workers; several reapers are harmless
because every change is a compare-and-set and each lapse is claimed once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from broker.jobstore import JobStore
from broker.schema import JobStatus
from workers.periodic import Periodic
from workers.render_queue import WorkQueue
from workers.transitions import Transitions

log = logging.getLogger("editfarm.reaper")

Claim = Callable[[str, float], bool]
"""(job id, lease_until) → True for the first reaper to claim that lapse."""

FindStranded = Callable[[float], list[str]]
"""(queued since before, epoch s) → queued jobs whose render message is nowhere (broker.queues)."""


class Reaper:
    """Sweeps the job store every ``interval_s``: re-sends lapsed jobs through ``queue`` (a lapse
    taken by ``claim`` first) and expires overdue queued ones through ``transitions`` (no model,
    no runner: expiring is a transition only)."""

    def __init__(self, *, store: JobStore, transitions: Transitions, queue: WorkQueue, claim: Claim,
                 interval_s: float = 2.0, find_stranded: FindStranded | None = None,
                 claim_stranded: Callable[[str], bool] | None = None, stranded_after_s: float = 300.0,
                 stranded_every_s: float = 30.0) -> None:
        self.store, self.transitions, self.queue, self.claim = store, transitions, queue, claim
        self.interval_s = interval_s
        self.find_stranded, self.claim_stranded = find_stranded, claim_stranded or (lambda job_id: True)
        self.stranded_after_s, self.stranded_every_s = stranded_after_s, stranded_every_s
        self._stranded_checked_at = float("-inf")
        self._periodic = Periodic(name="editfarm-reaper", interval_s=self.interval_s, task=self.sweep)

    def sweep(self, now: float | None = None) -> dict[str, int]:
        """One pass; returns how many jobs were requeued and expired."""
        now = time.time() if now is None else now
        requeued = expired = 0
        for job_id, lease_until in self.store.lapsed_leases(now):
            job = self.store.get(job_id)
            if job and job.status is JobStatus.RUNNING and self.claim(job_id, lease_until):
                log.warning("job %s: lease lapsed %.1f s ago; sending it to a worker again",
                            job_id, now - lease_until)
                self.queue.requeue(job)
                requeued += 1
        for job_id in self.store.overdue_queued(now):
            job = self.store.get(job_id)
            if job and job.status is JobStatus.QUEUED:
                self.transitions.expired(job)
                expired += 1
        return {"requeued": requeued, "expired": expired, "resent": self._resend_stranded(now)}

    def _resend_stranded(self, now: float) -> int:
        if self.find_stranded is None or now - self._stranded_checked_at < self.stranded_every_s:
            return 0
        self._stranded_checked_at = now
        resent = 0
        for job_id in self.find_stranded(now - self.stranded_after_s):
            job = self.store.get(job_id)
            if job and job.status is JobStatus.QUEUED and self.claim_stranded(job_id):
                log.warning("job %s: queued %.0f s with its render message nowhere; sending a new one",
                            job_id, now - job.created_at)
                self.queue.requeue(job)
                resent += 1
        return resent

    def start(self) -> threading.Thread:
        """Sweep every ``interval_s`` on a daemon thread (a failed pass is logged, the next one runs)."""
        return self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
