"""Strict priority when the device frees (workers/priority.py), against a real Redis and job store.

The job the render lane took early must give way to a higher one queued by then, wherever that
job's Celery message is: waiting in its list, or already taken by a worker (prefetched, in a render
task fetching its inputs, reserved as an ETA retry). The full sequence with a real worker is in
tests/test_e2e_priority.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from broker import keys
from broker.celery_app import RENDER_QUEUE_ORDER, RENDER_QUEUES, render_job_id
from broker.jobstore import RedisJobStore
from broker.queues import RenderQueue
from broker.schema import Job, JobParams, JobStatus, new_job_id
from workers.priority import PriorityGate


def job(priority: str) -> Job:
    return Job(id=new_job_id(), tenant="t", params=JobParams(prompt=priority, seed=1, priority=priority))  # type: ignore[arg-type]


def queued(store: RedisJobStore, priority: str, message_in_list: bool) -> Job:
    """A job queued in the store; its message in its Redis list, or taken by some worker."""
    made = job(priority)
    store.create(made)
    if message_in_list:
        queue, message = RenderQueue().message(made.id, priority)
        store.redis.lpush(queue, message)
    return made


def gate(redis_client: Any, wait_s: float = 0.4, consumed: tuple[str, ...] = RENDER_QUEUE_ORDER) -> PriorityGate:
    return PriorityGate(client=redis_client, queues=RenderQueue(client=redis_client), consumed=consumed, wait_s=wait_s)


@pytest.fixture()
def store(redis_client: Any) -> RedisJobStore:
    return RedisJobStore(redis_client)


def test_a_higher_message_waiting_in_its_list_makes_the_job_give_way_at_once(
        redis_client: Any, store: RedisJobStore) -> None:
    queued(store, "high", message_in_list=True)
    low = job("low")
    began = time.monotonic()
    assert gate(redis_client, wait_s=5).give_way(low) is True
    assert time.monotonic() - began < 2
    assert render_job_id(redis_client.rpop(RENDER_QUEUES["low"])) == low.id  # first in its own queue


def test_a_higher_job_whose_message_a_worker_took_still_makes_the_job_give_way(
        redis_client: Any, store: RedisJobStore) -> None:
    # the "whatever Celery prefetched": the high job is queued, its message in no list
    queued(store, "high", message_in_list=False)
    low = job("low")
    assert gate(redis_client).give_way(low) is True
    assert render_job_id(redis_client.rpop(RENDER_QUEUES["low"])) == low.id


def test_a_higher_job_that_starts_elsewhere_while_we_wait_lets_the_job_render(
        redis_client: Any, store: RedisJobStore) -> None:
    high = queued(store, "high", message_in_list=False)
    starter = threading.Timer(0.2, lambda: store.compare_and_set(
        high.id, {"status": [JobStatus.QUEUED]}, {"status": JobStatus.RUNNING, "worker": "other@host"}))
    starter.start()
    try:
        assert gate(redis_client, wait_s=5).give_way(job("normal")) is False
    finally:
        starter.join()
    assert redis_client.llen(RENDER_QUEUES["normal"]) == 0  # nothing pushed back


def test_a_higher_message_that_reappears_while_we_wait_makes_the_job_give_way(
        redis_client: Any, store: RedisJobStore) -> None:
    high = queued(store, "high", message_in_list=False)
    queue, message = RenderQueue().message(high.id, "high")
    pusher = threading.Timer(0.2, lambda: redis_client.lpush(queue, message))
    pusher.start()
    try:
        assert gate(redis_client, wait_s=5).give_way(job("low")) is True
    finally:
        pusher.join()


def test_a_higher_job_stranded_with_its_message_taken_cannot_starve_lower_queues(
        redis_client: Any, store: RedisJobStore) -> None:
    queued(store, "high", message_in_list=False)
    low, gatekeeper = job("low"), gate(redis_client, wait_s=0.05)
    answers = [gatekeeper.give_way(low) for _ in range(gatekeeper.max_blind_rounds + 1)]
    assert answers == [True] * gatekeeper.max_blind_rounds + [False]
    assert 0 < redis_client.ttl(keys.gave_way(low.id)) <= gatekeeper.round_ttl_s


def test_only_the_queues_this_worker_consumes_count(redis_client: Any, store: RedisJobStore) -> None:
    queued(store, "high", message_in_list=True)
    queued(store, "high", message_in_list=False)
    low_only = gate(redis_client, wait_s=5, consumed=(RENDER_QUEUES["low"],))
    assert low_only.give_way(job("low")) is False
    assert redis_client.llen(RENDER_QUEUES["low"]) == 0


def test_nothing_outranks_high_and_equal_priorities_keep_their_order(
        redis_client: Any, store: RedisJobStore) -> None:
    queued(store, "high", message_in_list=True)
    queued(store, "normal", message_in_list=True)
    assert gate(redis_client).give_way(job("high")) is False
    assert gate(redis_client).give_way(job("normal")) is True  # the high one, not the other normal one
    redis_client.delete(RENDER_QUEUES["high"], keys.queued("high"))
    assert gate(redis_client).give_way(job("normal")) is False
