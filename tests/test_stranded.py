"""A queued job whose render message is nowhere (lost with a Redis primary that died before its replica
had the worker's bookkeeping) gets a new one from the reaper; one whose message waits in its list or
is held by a worker (kombu's unacked hash) does not (real Redis; workers/reaper.py, broker/queues.py)."""

from __future__ import annotations

import json
import time

import redis

from broker import keys
from broker.jobstore import RedisJobStore
from broker.queues import RenderQueue
from broker.schema import Job, JobParams, new_job_id
from editfarm_testing.workers import RecordingQueue
from workers.reaper import Reaper

MODEL = "qwen-image-edit"
AFTER_S = 300.0


def queued_job(store: RedisJobStore, queues: RenderQueue, age_s: float) -> tuple[Job, str, str]:
    job = Job(id=new_job_id(), tenant="acme", params=JobParams(prompt="p", seed=1, model=queues.model),
              created_at=time.time() - age_s)
    queue, message = queues.message(job.id, job.params.priority)
    store.create_and_enqueue(job, queue, message)
    return job, queue, message


def test_only_an_old_queued_job_whose_message_is_nowhere_is_sent_again(redis_client: redis.Redis) -> None:
    store, queues = RedisJobStore(redis_client), RenderQueue(model=MODEL, client=redis_client)
    waiting, _, _ = queued_job(store, queues, age_s=1000)  # its message still in the list
    lost, queue, message = queued_job(store, queues, age_s=1000)
    redis_client.lrem(queue, 1, message)  # taken by a worker, and the taking lost with the primary
    held, queue, message = queued_job(store, queues, age_s=1000)
    redis_client.lrem(queue, 1, message)  # taken by a worker that holds it unacknowledged
    redis_client.hset(keys.KOMBU_UNACKED, "tag-1", json.dumps([json.loads(message), "", queue]))
    young, queue, message = queued_job(store, queues, age_s=10)
    redis_client.lrem(queue, 1, message)  # taken just now: its bookkeeping may be on its way
    other_model = RenderQueue(model="qwen-image", client=redis_client)
    old_elsewhere, queue, message = queued_job(store, other_model, age_s=1000)
    redis_client.lrem(queue, 1, message)  # stranded too, but another model's: its own queues find it
    now = time.time()
    assert queues.stranded(now - AFTER_S) == [lost.id]
    assert waiting.id in queues.held_job_ids() and held.id in queues.held_job_ids()

    requeue = RecordingQueue()
    claimed: set[str] = set()

    def claim_once(job_id: str) -> bool:
        first = job_id not in claimed
        claimed.add(job_id)
        return first

    reaper = Reaper(store=store, transitions=None, queue=requeue, claim=lambda job_id, lease: True,  # type: ignore[arg-type]
                    find_stranded=queues.stranded, claim_stranded=claim_once, stranded_after_s=AFTER_S,
                    stranded_every_s=0)
    assert reaper.sweep(now)["resent"] == 1 and requeue.requeued == [lost.id]
    assert reaper.sweep(now)["resent"] == 0  # claimed: one new message per job per wait
    assert old_elsewhere.id not in requeue.requeued
    assert other_model.stranded(now - AFTER_S) == [old_elsewhere.id]


def test_the_stranded_check_does_not_read_the_lists_when_no_job_is_old(redis_client: redis.Redis) -> None:
    store, queues = RedisJobStore(redis_client), RenderQueue(model=MODEL, client=redis_client)
    queued_job(store, queues, age_s=1)
    redis_client.set(keys.KOMBU_UNACKED, "not a hash")  # reading it would raise WRONGTYPE
    assert queues.stranded(time.time() - AFTER_S) == []
