"""The pipelined runner: a job's finish runs in the background, the next job's inputs are prefetched.

Unit level, with in-memory stand-ins for the stores and a fake renderer; the real path (Celery
prefork workers, Redis, S3 over HTTP, kill -9 during a finish) is in test_e2e_workers.py and
test_faults.py, whose workers run with these settings on (the default).
"""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import pytest
from PIL import Image

from broker.events import InMemoryEventPublisher
from broker.schema import Job, JobParams, JobStatus, new_job_id
from broker.store import InMemoryJobStore, JobStore, RedisJobStore
from storage import InMemoryObjectStore, StorageUnavailable
from workers.pipeline.base import Renderer, RenderRequest
from workers.pipelining import Finisher, Pipelining
from workers.runner import Runner, RunnerConfig


class RecordingObjects(InMemoryObjectStore):
    """An object store that logs every get/put, and whose puts can be blocked or made to fail."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.put_gate = threading.Event()
        self.put_gate.set()
        self.put_error: Exception | None = None

    def get(self, key: str) -> bytes:
        self.log.append(f"get {key}")
        return super().get(key)

    def put(self, key: str, data: bytes, content_type: str) -> Any:
        self.put_gate.wait(10)
        if self.put_error is not None and not key.startswith("in/"):
            raise self.put_error
        if not key.startswith("in/"):
            self.log.append(f"put {next(part for part in key.split('/') if part.startswith('job_'))}")
        return super().put(key, data, content_type)


class LoggingRenderer(Renderer):
    device = "cpu"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def render(self, request: RenderRequest, on_step=None):  # type: ignore[no-untyped-def]
        self.log.append(f"render {request.prompt}")
        for step in range(1, request.steps + 1):
            time.sleep(0.01)
            if on_step:
                on_step(step, request.steps)
        return [Image.new("RGB", request.images[0].size, (request.seed % 255, 0, 0))]

    def healthcheck(self) -> None:
        pass

    def warmup(self) -> None:
        pass


class Pipelined:
    def __init__(self, **pipelining: Any) -> None:
        self.log: list[str] = []
        self.store = InMemoryJobStore()
        self.objects = RecordingObjects(self.log)
        self.requeued: list[str] = []
        self.notified: list[str] = []
        self.pipelining = Pipelining(**{"finish_hold_s": 2.0, **pipelining})
        self.runner = Runner(self.store, self.objects, InMemoryEventPublisher(), LoggingRenderer(self.log),
                             lambda job, event: self.notified.append(f"{job.id} {event}"),
                             RunnerConfig(worker_name="w@test", heartbeat_interval_s=0.05, lease_s=30),
                             requeue=lambda job: self.requeued.append(job.id), pipelining=self.pipelining)

    def submit(self, name: str) -> Job:
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), "white").save(buf, format="PNG")
        job = Job(id=new_job_id(), tenant="acme", input_keys=[f"in/{name}.png"],
                  params=JobParams(prompt=name, steps=2, seed=3, webhook="https://hooks.example/x"))
        self.objects.put(f"in/{name}.png", buf.getvalue(), "image/png")
        self.store.create(job)
        time.sleep(0.002)  # distinct created_at: queue order
        return job

    def settle(self) -> None:
        assert self.pipelining.drain(10)
        if self.pipelining.prefetcher is not None:
            self.pipelining.prefetcher.wait(10)

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        assert job is not None
        return job


def test_a_rendered_job_returns_at_once_and_succeeds_once_its_finish_is_done() -> None:
    p = Pipelined(prefetch_inputs=False)
    job = p.submit("a")
    p.objects.put_gate.clear()
    assert p.runner.run(job.id) is JobStatus.RUNNING
    running = p.job(job.id)
    assert running.status is JobStatus.RUNNING and running.lease_until is not None
    assert running.lease_until > time.time() and p.notified == []
    p.objects.put_gate.set()
    p.settle()
    done = p.job(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.lease_until is None and len(done.outputs) == 1
    assert p.notified == [f"{job.id} job.succeeded"]


def test_the_lease_keeps_beating_while_the_finish_runs() -> None:
    p = Pipelined(prefetch_inputs=False)
    job = p.submit("a")
    p.objects.put_gate.clear()
    p.runner.run(job.id)
    first = p.job(job.id).lease_until
    time.sleep(0.3)  # six heartbeats
    renewed = p.job(job.id).lease_until
    p.objects.put_gate.set()
    p.settle()
    assert first is not None and renewed is not None and renewed > first


def test_when_another_job_is_queued_the_finish_waits_for_its_render_to_start() -> None:
    p = Pipelined()
    a, b = p.submit("a"), p.submit("b")
    p.runner.run(a.id)
    p.runner.run(b.id)
    p.settle()
    order = [line for line in p.log if line.startswith(("render", "put"))]
    assert order == ["render a", "render b", f"put {a.id}", f"put {b.id}"]
    assert p.job(a.id).status is p.job(b.id).status is JobStatus.SUCCEEDED


def test_the_next_jobs_inputs_are_fetched_while_the_current_one_renders() -> None:
    p = Pipelined()
    a, b = p.submit("a"), p.submit("b")
    p.runner.run(a.id)
    p.settle()
    assert "get in/b.png" in p.log  # fetched before b ran
    p.log.clear()
    p.runner.run(b.id)
    p.settle()
    assert "get in/b.png" not in p.log
    assert p.pipelining.prefetcher is not None and p.pipelining.prefetcher.hits == 1
    assert p.job(b.id).status is JobStatus.SUCCEEDED


def test_a_prefetched_job_another_worker_took_is_not_used_for_a_different_job() -> None:
    p = Pipelined()
    a, b, c = p.submit("a"), p.submit("b"), p.submit("c")
    p.runner.run(a.id)  # prefetches b
    p.settle()
    p.store.transition(b.id, JobStatus.CANCELED, {}, from_=[JobStatus.QUEUED])  # b goes elsewhere
    p.log.clear()
    p.runner.run(c.id)
    p.settle()
    assert "get in/c.png" in p.log and p.job(c.id).status is JobStatus.SUCCEEDED
    assert p.pipelining.prefetcher is not None and p.pipelining.prefetcher.misses >= 1


def test_storage_down_during_a_background_finish_hands_the_job_back_and_resends_it_once() -> None:
    p = Pipelined(prefetch_inputs=False)
    job = p.submit("a")
    p.objects.put_error = StorageUnavailable("s3 down")
    p.runner.run(job.id)
    p.settle()
    back = p.job(job.id)
    assert back.status is JobStatus.QUEUED and back.handbacks == 1 and back.worker is None
    assert p.requeued == [job.id] and p.notified == []


def test_an_output_that_cannot_be_stored_fails_the_job_with_upload_failed() -> None:
    p = Pipelined(prefetch_inputs=False)
    job = p.submit("a")
    p.objects.put_error = ValueError("bad bucket policy")
    p.runner.run(job.id)
    p.settle()
    failed = p.job(job.id)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.code == "upload_failed" and p.notified == [f"{job.id} job.failed"]


def test_a_job_canceled_during_its_finish_stays_canceled() -> None:
    p = Pipelined(prefetch_inputs=False)
    job = p.submit("a")
    p.objects.put_gate.clear()
    p.runner.run(job.id)
    assert p.store.transition(job.id, JobStatus.CANCELED, {}, from_=[JobStatus.RUNNING]) is not None
    p.objects.put_gate.set()
    p.settle()
    assert p.job(job.id).status is JobStatus.CANCELED and p.notified == []


def test_without_a_finisher_the_runner_finishes_before_it_returns() -> None:
    p = Pipelined(finish_in_background=False)
    job = p.submit("a")
    assert p.runner.run(job.id) is JobStatus.SUCCEEDED


def test_a_second_finish_waits_for_the_first() -> None:
    finisher = Finisher(hold_s=0)
    order: list[str] = []
    gate = threading.Event()
    finisher.submit(lambda: (gate.wait(5), order.append("first")), next_job_queued=False)
    threading.Timer(0.1, gate.set).start()
    finisher.submit(lambda: order.append("second"), next_job_queued=False)
    assert finisher.wait(5)
    assert order == ["first", "second"]


def test_wait_reports_a_finish_still_running_after_its_timeout() -> None:
    finisher = Finisher()
    gate = threading.Event()
    finisher.submit(lambda: gate.wait(5), next_job_queued=False)
    assert finisher.wait(0.05) is False and finisher.busy
    gate.set()
    assert finisher.wait(5) and not finisher.busy


@pytest.fixture(params=["redis", "memory"])
def job_store(request: pytest.FixtureRequest) -> JobStore:
    if request.param == "memory":
        return InMemoryJobStore()
    return RedisJobStore(request.getfixturevalue("redis_client"))


@pytest.mark.parametrize("exclude", [None, "first"])
def test_next_queued_is_the_head_of_the_strict_priority_order(job_store: JobStore, exclude: str | None) -> None:
    ids = {}
    for name, priority in (("low", "low"), ("first", "high"), ("second", "high"), ("normal", "normal")):
        job = Job(id=new_job_id(), tenant="t",
                  params=JobParams(prompt=name, priority=priority, seed=1))  # type: ignore[arg-type]
        job_store.create(job)
        ids[name] = job.id
        time.sleep(0.002)
    expected = "second" if exclude else "first"
    assert job_store.next_queued(exclude=ids[exclude] if exclude else None) == ids[expected]


def test_next_queued_is_none_when_nothing_else_waits(job_store: JobStore) -> None:
    job = Job(id=new_job_id(), tenant="t", params=JobParams(prompt="only", seed=1))
    job_store.create(job)
    assert job_store.next_queued(exclude=job.id) is None
    job_store.transition(job.id, JobStatus.RUNNING, {}, from_=[JobStatus.QUEUED])
    assert job_store.next_queued() is None
