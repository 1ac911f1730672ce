"""A render message built by hand (``broker.queues.RenderQueue``), pushed with the job record by
``JobStore.create_and_enqueue`` outside the API, is consumed by a real Celery render worker."""

from __future__ import annotations

import pytest
import redis

from broker.jobstore import RedisJobStore
from broker.queues import RenderQueue
from broker.schema import Job, JobParams, Operation, Priority, new_job_id
from cli.cluster import LocalCluster
from editfarm_testing.catalog import EDIT_MODEL
from tests.e2e_support import wait_terminal

pytestmark = pytest.mark.integration


def test_a_real_worker_runs_a_job_queued_by_a_hand_built_message(shared_cluster: LocalCluster) -> None:
    client = redis.Redis.from_url(shared_cluster.redis_url)
    try:
        job = Job(id=new_job_id(), tenant="acme", params=JobParams(
            operation=Operation.GENERATE, prompt="a red bicycle", seed=7, steps=2, width=64, height=64,
            priority=Priority.HIGH, model=EDIT_MODEL))
        queue, message = RenderQueue(model=EDIT_MODEL).message(job.id, job.params.priority)
        assert queue == f"render.{EDIT_MODEL}.high"
        assert RedisJobStore(client).create_and_enqueue(job, queue, message) is not None
        done = wait_terminal(shared_cluster.api_url, job.id)
        assert done["status"] == "succeeded", done
        assert len(done["outputs"]) == 1 and done["attempts"] == 1
        assert client.llen(queue) == 0  # taken off its list by the worker
    finally:
        client.close()
