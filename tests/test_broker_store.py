"""The JobStore's compare-and-set semantics, on real Redis and on the in-memory stand-in."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import redis

from broker.jobstore import InMemoryJobStore, JobStore, RedisJobStore
from broker.schema import Job, JobParams, JobStatus, Priority, new_job_id


@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest, redis_client: redis.Redis) -> JobStore:
    return RedisJobStore(redis_client) if request.param == "redis" else InMemoryJobStore()


def make_job(tenant: str = "acme") -> Job:
    return Job(id=new_job_id(), tenant=tenant, params=JobParams(prompt="make the sky purple", seed=7))


def test_a_created_job_reads_back_equal(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    assert store.get(job.id) == job


def test_creating_the_same_id_twice_is_refused(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    with pytest.raises(KeyError):
        store.create(job)


def test_an_unknown_job_is_none(store: JobStore) -> None:
    assert store.get("job_nope") is None
    assert store.transition("job_nope", JobStatus.RUNNING) is None


def test_another_tenant_cannot_read_a_job(store: JobStore) -> None:
    job = make_job("acme")
    store.create(job)
    assert store.get_for_tenant(job.id, "acme") is not None
    assert store.get_for_tenant(job.id, "globex") is None


def test_a_queued_job_moves_to_running_then_succeeded(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    running = store.transition(job.id, JobStatus.RUNNING, {"worker": "w1", "attempts": 1})
    assert running is not None and running.status is JobStatus.RUNNING and running.worker == "w1"
    done = store.transition(job.id, JobStatus.SUCCEEDED, {"finished_at": 5.0})
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.finished_at == 5.0


def test_a_succeeded_job_can_never_go_back_to_running(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    store.transition(job.id, JobStatus.RUNNING)
    store.transition(job.id, JobStatus.SUCCEEDED)
    assert store.transition(job.id, JobStatus.RUNNING) is None
    assert store.transition(job.id, JobStatus.FAILED) is None
    assert store.get(job.id).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


def test_a_queued_job_cannot_jump_to_succeeded(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    assert store.transition(job.id, JobStatus.SUCCEEDED) is None


def test_expectations_on_other_fields_guard_the_change(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    store.transition(job.id, JobStatus.RUNNING, {"worker": "w1"})
    assert store.transition(job.id, JobStatus.FAILED, expect={"worker": ["w2"]}) is None
    assert store.transition(job.id, JobStatus.FAILED, expect={"worker": ["w1"]}) is not None


def test_only_one_of_many_concurrent_starts_wins(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    wins: list[str] = []

    def start(name: str) -> None:
        if store.transition(job.id, JobStatus.RUNNING, {"worker": name}, from_=[JobStatus.QUEUED]):
            wins.append(name)

    threads = [threading.Thread(target=start, args=(f"w{i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get(job.id).worker == wins[0]  # type: ignore[union-attr]


def test_a_tenants_jobs_are_listed_newest_first(store: JobStore) -> None:
    jobs = [make_job("acme") for _ in range(3)]
    for offset, job in enumerate(jobs):
        store.create(job.model_copy(update={"created_at": 1000.0 + offset}))
    store.create(make_job("globex"))
    assert store.tenant_job_ids("acme") == [j.id for j in reversed(jobs)]
    assert store.tenant_job_ids("acme", offset=1, limit=1) == [jobs[1].id]


def test_terminal_statuses_are_terminal() -> None:
    assert [s.value for s in JobStatus if s.is_terminal] == ["succeeded", "failed", "canceled"]


def test_queue_position_follows_strict_priority_then_age(store: JobStore) -> None:
    from broker.schema import Priority

    def job(priority: Priority, created_at: float) -> Job:
        j = make_job()
        return j.model_copy(update={"created_at": created_at,
                                    "params": j.params.model_copy(update={"priority": priority})})

    low, normal1, normal2, high = (job(Priority.LOW, 1), job(Priority.NORMAL, 2), job(Priority.NORMAL, 3),
                                   job(Priority.HIGH, 4))
    for j in (low, normal1, normal2, high):
        store.create(j)
    assert [store.queue_position(j.id) for j in (high, normal1, normal2, low)] == [0, 1, 2, 3]
    assert store.queued_count(Priority.NORMAL) == 2
    store.transition(high.id, JobStatus.RUNNING, {"lease_until": 50.0})
    assert store.queue_position(high.id) is None
    assert store.queue_position(low.id) == 2
    assert store.running_count() == 1


def test_running_jobs_with_lapsed_leases_are_found_and_leave_the_index_when_done(store: JobStore) -> None:
    a, b = make_job(), make_job()
    store.create(a)
    store.create(b)
    store.transition(a.id, JobStatus.RUNNING, {"lease_until": 100.0})
    store.transition(b.id, JobStatus.RUNNING, {"lease_until": 300.0})
    assert store.lapsed_leases(now=200.0) == [(a.id, 100.0)]
    store.compare_and_set(a.id, {"status": ["running"]}, {"lease_until": 400.0})
    assert store.lapsed_leases(now=200.0) == []
    store.transition(b.id, JobStatus.SUCCEEDED)
    assert store.lapsed_leases(now=1000.0) == [(a.id, 400.0)]
    assert store.running_count() == 1


def test_queued_jobs_past_their_deadline_are_found(store: JobStore) -> None:
    soon = make_job()
    soon = soon.model_copy(update={"created_at": 10.0,
                                   "params": soon.params.model_copy(update={"queue_deadline_s": 5.0})})
    never = make_job()
    store.create(soon)
    store.create(never)
    assert store.overdue_queued(now=14.0) == []
    assert store.overdue_queued(now=16.0) == [soon.id]
    store.transition(soon.id, JobStatus.CANCELED)
    assert store.overdue_queued(now=16.0) == []


def test_a_tenants_in_flight_count_follows_its_jobs(store: JobStore) -> None:
    a, b, other = make_job("acme"), make_job("acme"), make_job("globex")
    for job in (a, b, other):
        store.create(job)
    assert store.tenant_active_count("acme") == 2
    store.transition(a.id, JobStatus.RUNNING)
    assert store.tenant_active_count("acme") == 2
    store.transition(a.id, JobStatus.SUCCEEDED)
    store.transition(b.id, JobStatus.CANCELED)
    assert store.tenant_active_count("acme") == 0 and store.tenant_active_count("globex") == 1


@pytest.mark.parametrize("value", [0, -5, 10**30, 1.5, 2.0, float("inf"), True, False, None, "", 'é"\\\n\x00🚲',
                                   {"b": 1, "a": [1, "x", None]}, [], Priority.HIGH, JobStatus.QUEUED])
def test_the_store_encodes_every_value_as_json_dumps_with_sorted_keys_would(value: Any) -> None:
    from broker.jobstore import encode as _encode

    assert _encode(value) == json.dumps(value, separators=(",", ":"), sort_keys=True)
