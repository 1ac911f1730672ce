"""The retention sweeper: finished jobs leave Redis once their retention has ended.

It runs as a thread in the CPU webhook workers, beside the reaper. Each pass reads only the due jobs
(the expiry index, ``broker.retention``), optionally archives each record to the object store first
(``tenants/<t>/jobs/<id>/job.json``, what ``GET /v1/jobs/{id}`` answers from afterwards), then deletes
it with a script that checks again, atomically, that the job is still terminal and due. Several
sweepers are harmless: a job deleted twice is deleted once, and an archive written twice is the
same object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from broker import keys
from broker.jobstore import JobStore
from broker.retention import DELETED, RetentionIndex
from storage import ObjectStore
from workers.periodic import Periodic

log = logging.getLogger("editfarm.sweeper")


class RetentionSweeper:
    """Deletes due terminal jobs every ``interval_s``, at most ``batch`` per store round trip.
    ``archive``: an object store to write each record to before it goes (None: no archive).
    ``clock``: epoch seconds (tests move it instead of waiting)."""

    def __init__(self, *, store: JobStore, index: RetentionIndex, archive: ObjectStore | None = None,
                 interval_s: float = 10.0, batch: int = 500, clock: Callable[[], float] = time.time) -> None:
        self.store, self.index, self.archive = store, index, archive
        self.interval_s, self.batch, self.clock = interval_s, batch, clock
        self._periodic = Periodic(name="editfarm-retention", interval_s=self.interval_s, task=self.sweep)

    def sweep(self, max_jobs: int = 100_000) -> dict[str, int]:
        """Passes over the due jobs until none is left (or ``max_jobs`` were looked at); how many were
        deleted and how many were skipped (made live again, or not due after all).

        Raises:
            redis.RedisError: Redis is unreachable.
            storage.StorageUnavailable: the archive could not be written (the job then stays).
        """
        now = self.clock()
        deleted = skipped = 0
        while deleted + skipped < max_jobs:
            due = self.index.due(now, limit=self.batch)
            if not due:
                break
            for job_id in due:
                self._archive(job_id)
                if self.index.delete(job_id, now) == DELETED:
                    deleted += 1
                else:
                    skipped += 1  # the script corrected the job's place in the index
        if deleted:
            log.info("retention: %d finished job(s) left Redis", deleted)
        return {"deleted": deleted, "skipped": skipped}

    def _archive(self, job_id: str) -> None:
        if self.archive is None:
            return
        job = self.store.get(job_id)
        if job is None or not job.status.is_terminal:
            return  # the delete script decides; nothing worth archiving
        # the record, not the rendered view: the API renders it as it renders a live one (fresh
        # presigned URLs, data_removed), so the body is the same
        self.archive.put(keys.job_archive_object(job.tenant, job.id), job.model_dump_json().encode(),
                         "application/json")

    def start(self) -> threading.Thread:
        """Sweep every ``interval_s`` on a daemon thread (a failed pass is logged, the next one runs)."""
        return self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
