"""The object sweeper (``EDITFARM_OBJECT_SWEEPER``, workers/object_sweeper.py) against the real S3 server
(SeaweedFS, a bucket per test) and the job store on Redis: for a store without lifecycle rules, a
finished job's objects go once the object retention has passed, a live job's never."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from broker import keys
from broker.jobstore import RedisJobStore
from broker.retention import data_removed
from broker.schema import Job, JobParams, JobStatus, Output, new_job_id
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings
from storage import S3ObjectStore
from storage.listing import list_page
from workers.object_sweeper import ObjectSweeper
from workers.settings import WorkerSettings

DAY_S = 86400


@pytest.fixture()
def store(redis_client: redis.Redis) -> RedisJobStore:
    return RedisJobStore(redis_client)


def job_with_objects(store: RedisJobStore, s3: S3ObjectStore, status: JobStatus, finished_at: float | None = None,
                     tenant: str = "acme") -> tuple[Job, list[str]]:
    """A job in ``status`` with an input, a preview and (when it ended) an output in the bucket."""
    job_id = new_job_id()
    objects = [keys.input_object(tenant, job_id, 0, "png"), keys.preview_object(tenant, job_id, 2)]
    outputs = []
    if finished_at is not None:
        objects.append(keys.output_object(tenant, job_id, 0, "png"))
        outputs.append(Output(key=objects[-1], content_type="image/png", width=8, height=8, sha256="0" * 64,
                              size_bytes=3).model_dump())
    for key in objects:
        s3.put(key, b"png", "image/png")
    job = Job(id=job_id, tenant=tenant, params=JobParams(prompt="p", seed=1), input_keys=[objects[0]])
    store.create(job)
    if status is not JobStatus.QUEUED:
        store.transition(job_id, JobStatus.RUNNING, {"worker": "w", "lease_until": time.time() + 60})
    if finished_at is not None:
        store.transition(job_id, status, {"finished_at": finished_at, "outputs": outputs})
    found = store.get(job_id)
    assert found is not None
    return found, objects


def in_bucket(s3: S3ObjectStore) -> set[str]:
    return {item.key for item in list_page(s3, "", limit=1000)}


def test_a_finished_jobs_objects_go_after_a_short_retention_and_a_live_jobs_stay(
        store: RedisJobStore, s3: S3ObjectStore) -> None:
    done, done_objects = job_with_objects(store, s3, JobStatus.SUCCEEDED, finished_at=time.time())
    failed, failed_objects = job_with_objects(store, s3, JobStatus.FAILED, finished_at=time.time())
    running, running_objects = job_with_objects(store, s3, JobStatus.RUNNING)
    queued, queued_objects = job_with_objects(store, s3, JobStatus.QUEUED)
    orphan = keys.output_object("acme", new_job_id(), 0, "png")  # its record left Redis: by its age
    s3.put(orphan, b"png", "image/png")
    sweeper = ObjectSweeper(objects=s3, store=store, retention_s=1.5, page=2)  # 2 a page: several pages
    assert sweeper.sweep() == {"deleted": 0, "kept_live": 4}
    assert in_bucket(s3) == {*done_objects, *failed_objects, *running_objects, *queued_objects, orphan}
    time.sleep(2.5)  # SeaweedFS keeps LastModified to the second
    swept = sweeper.sweep()
    assert in_bucket(s3) == {*running_objects, *queued_objects}  # however old their inputs are
    assert swept == {"deleted": 7, "kept_live": 4}
    assert sweeper.sweep() == {"deleted": 0, "kept_live": 4}  # the next pass starts over


def test_a_pass_goes_on_where_the_last_one_stopped(store: RedisJobStore, s3: S3ObjectStore) -> None:
    jobs = [job_with_objects(store, s3, JobStatus.SUCCEEDED, finished_at=time.time() - 2 * DAY_S)
            for _ in range(3)]
    sweeper = ObjectSweeper(objects=s3, store=store, retention_s=DAY_S, page=2, pages_per_pass=1)
    first = sweeper.sweep()["deleted"]
    assert 0 < first < 9 and len(in_bucket(s3)) == 9 - first  # one page of 2 objects listed
    while in_bucket(s3):
        sweeper.sweep()
    assert all(store.get(job.id) is not None for job, _ in jobs)  # the records are the retention sweeper's


def test_the_view_says_data_removed_from_the_moment_the_sweeper_may_delete(
        redis_client: redis.Redis, store: RedisJobStore, s3: S3ObjectStore) -> None:
    """The same rule as the bucket's lifecycle path: finished_at + EDITFARM_OBJECT_RETENTION_DAYS."""
    now = time.time()
    old, old_objects = job_with_objects(store, s3, JobStatus.SUCCEEDED, finished_at=now - DAY_S - 60)
    new, new_objects = job_with_objects(store, s3, JobStatus.SUCCEEDED, finished_at=now - DAY_S + 60)
    ObjectSweeper(objects=s3, store=store, retention_s=DAY_S).sweep()
    assert in_bucket(s3) == set(new_objects)
    assert data_removed(old, 1, now) and not data_removed(new, 1, now)
    services = fake_services(make_settings(object_retention_days=1))
    services.store, services.objects = store, s3
    with TestClient(create_app(services=services)) as http:
        views: dict[str, Any] = {job.id: http.get(f"/v1/jobs/{job.id}", headers={
            "Authorization": f"Bearer {TEST_KEYS['acme']}"}).json() for job in (old, new)}
    assert views[old.id]["data_removed"] is True and views[old.id]["outputs"][0]["url"] is None
    assert views[new.id]["data_removed"] is False and views[new.id]["outputs"][0]["url"]


def test_the_webhook_worker_runs_it_only_when_asked_and_with_a_retention() -> None:
    from workers.services import WorkerServices

    base = {"redis_url": "redis://127.0.0.1:9/0", "s3_endpoint_url": "http://127.0.0.1:9"}
    assert WorkerServices.connect(WorkerSettings(**base, object_retention_days=3), celery=None).object_sweeper() is None
    assert WorkerServices.connect(WorkerSettings(**base, object_sweeper=True), celery=None).object_sweeper() is None
    sweeper = WorkerServices.connect(WorkerSettings(**base, object_sweeper=True, object_retention_days=3,
                                                    object_sweep_interval_s=60), celery=None).object_sweeper()
    assert sweeper is not None and sweeper.retention_s == 3 * DAY_S and sweeper.interval_s == 60
