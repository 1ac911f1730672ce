"""The object sweeper: a finished job's objects leave the bucket once the object retention has passed,
for a store without lifecycle rules (``EDITFARM_OBJECT_SWEEPER=true``; where the store has them,
``editfarm storage lifecycle apply`` writes a bucket rule instead and nothing runs here).

It runs as a thread in the CPU webhook workers, beside the retention sweeper. Each pass lists the
bucket under ``tenants/`` a page at a time, going on from where the last pass stopped (a bucket of
millions of objects is covered over several passes, at most ``pages_per_pass`` list requests each),
and deletes in batches the objects of jobs that ended more than ``EDITFARM_OBJECT_RETENTION_DAYS``
ago: by the job's ``finished_at`` while its record is in the job store (the instant from which its
view says ``data_removed: true`` and gives no output URL, ``broker.retention.data_removed``), else
by the object's own age, as a lifecycle rule does. A queued or running job's objects are never
deleted, however old its inputs. Several sweepers are harmless: an object deleted twice is deleted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from broker import keys
from broker.jobstore import JobStore
from broker.schema import Job
from storage import S3ObjectStore
from storage.listing import ListedObject, delete_keys, list_page
from workers.periodic import Periodic

log = logging.getLogger("editfarm.sweeper")


class ObjectSweeper:
    """Deletes the objects of jobs that ended more than ``retention_s`` ago, every ``interval_s``.
    ``clock``: epoch seconds (tests move it instead of waiting)."""

    def __init__(self, *, objects: S3ObjectStore, store: JobStore, retention_s: float, interval_s: float = 600.0,
                 page: int = 1000, pages_per_pass: int = 100, clock: Callable[[], float] = time.time) -> None:
        self.objects, self.store, self.retention_s = objects, store, retention_s
        self.interval_s, self.page, self.pages_per_pass, self.clock = interval_s, page, pages_per_pass, clock
        self._after: str | None = None  # where the next pass goes on listing (None: from the start)
        self._periodic = Periodic(name="editfarm-object-retention", interval_s=self.interval_s, task=self.sweep)

    def sweep(self) -> dict[str, int]:
        """One pass: up to ``pages_per_pass`` pages of the bucket; how many objects were deleted, and
        how many were kept because their job is still queued or running.

        Raises:
            storage.StorageUnavailable: the bucket is unreachable (the pass starts there again).
            redis.RedisError: the job store is unreachable.
        """
        cutoff = self.clock() - self.retention_s
        jobs: dict[str, Job | None] = {}  # the records read this pass (a job's objects are listed together)
        deleted = live = 0
        for _ in range(self.pages_per_pass):
            listed = list_page(self.objects, keys.JOB_OBJECTS_PREFIX, self._after, self.page)
            due: list[str] = []
            for item in listed:
                verdict = self._due(item, cutoff, jobs)
                live += verdict is None
                if verdict:
                    due.append(item.key)
            deleted += delete_keys(self.objects, due)
            if len(listed) < self.page:  # the end of the bucket: the next pass starts over
                self._after = None
                break
            self._after = listed[-1].key
            if len(jobs) > 10 * self.page:
                jobs.clear()
        if deleted:
            log.info("object retention: %d object(s) of finished jobs deleted", deleted)
        return {"deleted": deleted, "kept_live": live}

    def _due(self, item: ListedObject, cutoff: float, jobs: dict[str, Job | None]) -> bool | None:
        """Whether the object goes now; None: its job is still queued or running (kept)."""
        job_id = keys.job_of_object(item.key)
        if job_id is None:
            return item.modified_at < cutoff  # under tenants/ but not a job's: by its age, as the rule
        if job_id not in jobs:
            jobs[job_id] = self.store.get(job_id)
        job = jobs[job_id]
        if job is not None and not job.status.is_terminal:
            return None
        if job is not None and job.finished_at is not None:
            return job.finished_at < cutoff
        return item.modified_at < cutoff  # its record left the job store: by the object's age

    def start(self) -> threading.Thread:
        """Sweep every ``interval_s`` on a daemon thread (a failed pass is logged, the next one runs)."""
        return self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()
