"""A running job's lease: the worker's claim on it, renewed by a heartbeat thread until released.

Another worker may take a running job over only after its lease has lapsed (``lease_until``
in the past), so a live run is never duplicated; a run whose renewal fails (the job was
canceled, or taken over after this process stalled past its lease) is told to stop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol, Self

from broker.jobstore import JobStore
from broker.schema import Job, JobStatus

log = logging.getLogger("editfarm.runner")


class LeaseTimes(Protocol):
    @property
    def lease_s(self) -> float: ...
    @property
    def heartbeat_interval_s(self) -> float: ...


class Lease:
    """This run's claim on ``job`` (as it was when taken): renewed by a heartbeat thread until released."""

    def __init__(self, store: JobStore, job: Job, token: str, config: LeaseTimes) -> None:
        self.store, self.job, self.job_id, self.token, self.config = store, job, job.id, token, config
        self.lost = threading.Event()
        self.stop_reason: str | None = None  # "lost" | "timeout" | "drain"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)

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
                self.stop("lost")
                return

    def stop(self, reason: str) -> None:
        """Ask the render to stop at its next step, remembering why (first reason wins)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.lost.set()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Stop renewing (idempotent): from here the lease lapses unless a transition cleared it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
