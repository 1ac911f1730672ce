"""The submission quota on the JobStore interface (check_quota, create_and_enqueue_within): the same
answers from the Redis script (lua/quota.lua) and the in-memory twin (jobstore.quota.over_rate)."""

from __future__ import annotations

import pytest
import redis

from broker import keys
from broker.jobstore import InMemoryJobStore, JobStore, Quota, RedisJobStore, over_rate
from broker.schema import Job, JobParams, new_job_id


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, redis_client: redis.Redis) -> JobStore:
    return RedisJobStore(redis_client) if request.param == "redis" else InMemoryJobStore()


def _job(tenant: str = "acme") -> Job:
    return Job(id=new_job_id(), tenant=tenant, params=JobParams(prompt="p", seed=1))


RATE_KEYS = (keys.rate_window("acme", 2), keys.rate_window("acme", 1))


def _rate(limit: int, weight: float = 0.5, *, check: bool = True, count: bool = True) -> Quota:
    return Quota(rate_limit=limit, rate_keys=RATE_KEYS, previous_weight=weight, counter_ttl_s=60,
                 check_rate=check, count=count)


def test_over_rate_is_the_sliding_window_estimate_against_the_limit() -> None:
    assert not over_rate(previous=0, current=2, previous_weight=1.0, limit=3)
    assert over_rate(previous=0, current=3, previous_weight=1.0, limit=3)
    assert not over_rate(previous=4, current=0, previous_weight=0.5, limit=3)  # 2 of the old 4 still weigh
    assert over_rate(previous=4, current=1, previous_weight=0.5, limit=3)


def test_the_rate_is_checked_counted_read_and_refusals_are_not_counted(store: JobStore) -> None:
    assert [store.check_quota("acme", _rate(2)).refused for _ in range(3)] == [None, None, "rate"]
    refused = store.check_quota("acme", _rate(2))
    assert refused.refused == "rate" and (refused.previous, refused.current) == (0, 2)
    read = store.check_quota("acme", _rate(2, check=False, count=False))
    assert read.refused is None and read.current == 2  # a read neither refuses nor counts
    counted = store.check_quota("acme", _rate(2, check=False))
    assert counted.refused is None and counted.current == 3  # a count without a check always counts
    assert store.check_quota("globex", Quota(rate_limit=2, rate_keys=(keys.rate_window("globex", 2),
                                                                        keys.rate_window("globex", 1)),
                                             counter_ttl_s=60)).current == 1


def test_the_in_flight_cap_is_checked_before_the_rate_and_a_create_counts_its_job(store: JobStore) -> None:
    quota = Quota(max_in_flight=2, rate_limit=10, rate_keys=RATE_KEYS, previous_weight=0.0, counter_ttl_s=60)
    first = store.create_and_enqueue_within(_job(), "q", "m1", quota)
    assert first.refused is None and first.position == 0 and first.active == 1 and first.current == 1
    assert store.check_quota("acme", quota).active == 1  # admitted (and counted): 1 < 2
    second = store.create_and_enqueue_within(_job(), "q", "m2", quota)
    assert second.active == 2 and second.current == 3
    late = _job()
    refused = store.create_and_enqueue_within(late, "q", "m3", quota)
    assert refused.refused == "in_flight" and refused.active == 2 and refused.position is None
    assert store.get(late.id) is None
    # not counted: the rate still reads 3
    assert store.check_quota("acme", Quota(rate_limit=10, rate_keys=RATE_KEYS, check_rate=False,
                                           count=False)).current == 3


def test_a_taken_id_raises_and_counts_nothing(store: JobStore) -> None:
    job = _job()
    store.create_and_enqueue_within(job, "q", "m", _rate(5))
    with pytest.raises(KeyError):
        store.create_and_enqueue_within(job, "q", "m", _rate(5))
    assert store.check_quota("acme", _rate(5, check=False, count=False)).current == 1


def test_the_async_forms_give_the_same_answers(store: JobStore) -> None:
    import asyncio

    async def run() -> tuple[str | None, str | None]:
        created = await store.create_and_enqueue_within_async(_job(), "q", "m", _rate(1))
        refused = await store.check_quota_async("acme", _rate(1))
        return created.refused, refused.refused

    assert asyncio.run(run()) == (None, "rate")
