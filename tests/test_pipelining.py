"""The pipelined runner: renders on a render thread, the next job is taken while one renders, finishes after.

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
from broker.jobstore import InMemoryJobStore
from broker.schema import Job, JobParams, JobStatus, new_job_id
from editfarm_testing.workers import FakeRenderer, RecordingQueue, finisher_busy
from storage import InMemoryObjectStore, StorageUnavailable
from workers.pipeline.base import RenderRequest
from workers.pipelining import Finisher, Pipelining, RenderLane
from workers.render_queue import CeleryRenderQueue
from workers.runner import RetryLater, Runner, RunnerConfig
from workers.transitions import Transitions


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


class LoggingRenderer(FakeRenderer):
    """tests/test_runner.py's fake renderer (one solid image, a sleep per step), logging each render."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.step_sleep_s = 0.01

    def render(self, request: RenderRequest, on_step=None, *, previews=None):  # type: ignore[no-untyped-def]
        self.log.append(f"render {request.prompt}")
        return super().render(request, on_step, previews=previews)


class Pipelined:
    def __init__(self, **pipelining: Any) -> None:
        self.log: list[str] = []
        self.store = InMemoryJobStore()
        self.objects = RecordingObjects(self.log)
        self.queue = RecordingQueue()
        self.requeued = self.queue.requeued
        self.notified: list[str] = []
        self.pipelining = Pipelining(**pipelining)
        config = RunnerConfig(worker_name="w@test", heartbeat_interval_s=0.05, lease_s=30)
        self.transitions = Transitions(store=self.store, publisher=InMemoryEventPublisher(), config=config,
                                       notify=lambda job, event: self.notified.append(f"{job.id} {event}"))
        self.runner = Runner(transitions=self.transitions, objects=self.objects, renderer=LoggingRenderer(self.log),
                             queue=self.queue, config=config, pipelining=self.pipelining)

    def submit(self, name: str) -> Job:
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), "white").save(buf, format="PNG")
        job = Job(id=new_job_id(), tenant="acme", input_keys=[f"in/{name}.png"],
                  params=JobParams(prompt=name, steps=2, seed=3, webhook="https://hooks.example/x"))
        self.objects.put(f"in/{name}.png", buf.getvalue(), "image/png")
        self.store.create(job)
        time.sleep(0.002)  # distinct created_at: queue order
        return job

    def one_renders_one_waits(self) -> tuple[Job, threading.Thread]:
        """Job a renders (0.6 s); job b's task has fetched its inputs and waits for the lane."""
        self.runner.renderer.step_sleep_s = 0.3  # type: ignore[attr-defined]
        a, b = self.submit("a"), self.submit("b")
        self.runner.run(a.id)
        waiting = threading.Thread(target=self.runner.run, args=(b.id,))
        waiting.start()
        time.sleep(0.2)
        return b, waiting

    def settle(self) -> None:
        assert self.pipelining.drain(10)

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        assert job is not None
        return job


def test_a_rendered_job_returns_at_once_and_succeeds_once_its_finish_is_done() -> None:
    p = Pipelined()
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
    p = Pipelined()
    job = p.submit("a")
    p.objects.put_gate.clear()
    p.runner.run(job.id)
    first = p.job(job.id).lease_until
    time.sleep(0.3)  # six heartbeats
    renewed = p.job(job.id).lease_until
    p.objects.put_gate.set()
    p.settle()
    assert first is not None and renewed is not None and renewed > first


def test_a_job_is_taken_and_its_inputs_fetched_while_the_previous_one_renders() -> None:
    p = Pipelined()
    p.runner.renderer.step_sleep_s = 0.2  # type: ignore[attr-defined]
    a, b = p.submit("a"), p.submit("b")
    assert p.runner.run(a.id) is JobStatus.RUNNING  # returns once a's render has started
    assert p.log[-1] == "render a"
    p.runner.run(b.id)  # prepares b (lease, inputs) while a renders; returns once b's render started
    p.settle()
    order = [line for line in p.log if line.startswith(("render", "get", "put"))]
    assert order.index("get in/b.png") < order.index(f"put {a.id}")  # b fetched before a was finished
    assert order.index("render b") < order.index(f"put {b.id}")
    assert p.job(a.id).status is p.job(b.id).status is JobStatus.SUCCEEDED


def test_a_job_waiting_for_the_device_stays_queued_with_its_inputs_fetched() -> None:
    p = Pipelined()
    b, waiting = p.one_renders_one_waits()
    held = p.job(b.id)
    assert held.status is JobStatus.QUEUED and held.attempts == 0 and "get in/b.png" in p.log
    waiting.join(10)
    p.settle()
    assert p.job(b.id).status is JobStatus.SUCCEEDED and p.job(b.id).attempts == 1


def test_a_job_canceled_while_it_waits_for_the_device_is_never_rendered() -> None:
    p = Pipelined()
    b, waiting = p.one_renders_one_waits()
    assert p.store.transition(b.id, JobStatus.CANCELED, {}, from_=[JobStatus.QUEUED]) is not None
    waiting.join(10)
    p.settle()
    assert p.job(b.id).status is JobStatus.CANCELED and not any(f"{b.id} job." in n for n in p.notified)
    assert "render b" not in p.log and not any(line.startswith(f"put {b.id}") for line in p.log)


def test_the_render_lane_answers_what_a_render_that_never_began_returned_or_raised() -> None:
    lane = RenderLane()
    assert lane.run(lambda began: "ended early", running="running") == "ended early"
    with pytest.raises(KeyError):
        lane.run(lambda began: {}["missing"], running="running")

    def starts(began: threading.Event) -> str:
        began.set()
        time.sleep(0.2)
        return "done"
    assert lane.run(starts, running="running") == "running"
    assert lane.wait(5)


def test_an_input_error_found_early_fails_the_job_once_it_is_started() -> None:
    p = Pipelined()
    job = p.submit("a")
    p.objects.put("in/a.png", b"not an image", "image/png")
    assert p.runner.run(job.id) is JobStatus.FAILED
    failed = p.job(job.id)
    assert failed.error is not None and failed.error.code == "input_unreadable" and failed.attempts == 1


def test_storage_down_while_fetching_early_hands_the_job_back_for_a_retry() -> None:
    p = Pipelined()
    job = p.submit("a")

    def down(key: str) -> bytes:
        raise StorageUnavailable("s3 down")
    p.objects.get = down  # type: ignore[method-assign]
    with pytest.raises(RetryLater):
        p.runner.run(job.id)
    back = p.job(job.id)
    assert back.status is JobStatus.QUEUED and back.handbacks == 1 and back.attempts == 1


def test_storage_down_during_a_background_finish_hands_the_job_back_and_resends_it_once() -> None:
    p = Pipelined()
    job = p.submit("a")
    p.objects.put_error = StorageUnavailable("s3 down")
    p.runner.run(job.id)
    p.settle()
    back = p.job(job.id)
    assert back.status is JobStatus.QUEUED and back.handbacks == 1 and back.worker is None
    assert p.requeued == [job.id] and p.notified == []


def test_an_output_that_cannot_be_stored_fails_the_job_with_upload_failed() -> None:
    p = Pipelined()
    job = p.submit("a")
    p.objects.put_error = ValueError("bad bucket policy")
    p.runner.run(job.id)
    p.settle()
    failed = p.job(job.id)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.code == "upload_failed" and p.notified == [f"{job.id} job.failed"]


def test_a_job_canceled_during_its_finish_stays_canceled() -> None:
    p = Pipelined()
    job = p.submit("a")
    p.objects.put_gate.clear()
    p.runner.run(job.id)
    assert p.store.transition(job.id, JobStatus.CANCELED, {}, from_=[JobStatus.RUNNING]) is not None
    p.objects.put_gate.set()
    p.settle()
    assert p.job(job.id).status is JobStatus.CANCELED and p.notified == []


def test_without_a_finisher_the_runner_finishes_before_it_returns() -> None:
    p = Pipelined(finish_in_background=False, render_lane=False)
    job = p.submit("a")
    assert p.runner.run(job.id) is JobStatus.SUCCEEDED


def test_a_second_finish_waits_for_the_first() -> None:
    finisher = Finisher()
    order: list[str] = []
    gate = threading.Event()
    finisher.submit(lambda: (gate.wait(5), order.append("first")))
    threading.Timer(0.1, gate.set).start()
    finisher.submit(lambda: order.append("second"))
    assert finisher.wait(5)
    assert order == ["first", "second"]


def test_wait_reports_a_finish_still_running_after_its_timeout() -> None:
    finisher = Finisher()
    gate = threading.Event()
    finisher.submit(lambda: gate.wait(5))
    assert finisher.wait(0.05) is False and finisher_busy(finisher)
    gate.set()
    assert finisher.wait(5) and not finisher_busy(finisher)


def test_a_job_taken_while_the_device_was_busy_gives_way_to_a_higher_priority_one() -> None:
    p = Pipelined()
    job = p.submit("a")
    gave_way: list[str] = []
    p.queue.give_way_to = lambda j: gave_way.append(j.id) is None
    assert p.runner.run(job.id) is JobStatus.QUEUED
    back = p.job(job.id)
    assert gave_way == [job.id] and back.status is JobStatus.QUEUED and back.attempts == 0
    assert "render a" not in p.log


def test_give_way_puts_the_job_first_in_its_queue_only_when_a_higher_message_waits(redis_client: Any) -> None:
    from broker.celery_app import RENDER_QUEUES, render_job_id

    queue = CeleryRenderQueue(redis_client=redis_client, celery=None)
    normal = Job(id=new_job_id(), tenant="t", params=JobParams(prompt="n", seed=1, priority="normal"))  # type: ignore[arg-type]
    high = Job(id=new_job_id(), tenant="t", params=JobParams(prompt="h", seed=1, priority="high"))  # type: ignore[arg-type]
    redis_client.lpush(RENDER_QUEUES["normal"], "a later normal message")
    assert queue.give_way(normal) is False and redis_client.llen(RENDER_QUEUES["normal"]) == 1
    redis_client.lpush(RENDER_QUEUES["high"], "a high message")
    assert queue.give_way(high) is False  # nothing outranks high
    assert queue.give_way(normal) is True
    assert render_job_id(redis_client.rpop(RENDER_QUEUES["normal"])) == normal.id  # next one popped


def test_a_requeue_goes_to_the_jobs_own_models_queue(redis_client: Any) -> None:
    # the reaper runs in a webhook worker (no model of its own) and re-sends any model's job
    from broker.celery_app import make_celery, render_job_id
    from broker.queues import RenderQueue

    celery = make_celery(f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0")
    try:
        queue = CeleryRenderQueue(redis_client=redis_client, celery=celery, model="qwen-image-edit")
        other = Job(id=new_job_id(), tenant="t", params=JobParams(prompt="p", seed=1, priority="low",  # type: ignore[arg-type]
                                                                  model="qwen-image"))
        legacy = Job(id=new_job_id(), tenant="t", params=JobParams(prompt="p", seed=1))
        queue.requeue(other)
        queue.requeue(legacy)
        low, normal = RenderQueue(model="qwen-image").name("low"), RenderQueue().name("normal")
        assert [render_job_id(m) for m in redis_client.lrange(low, 0, -1)] == [other.id]
        assert [render_job_id(m) for m in redis_client.lrange(normal, 0, -1)] == [legacy.id]
        assert redis_client.llen(RenderQueue(model="qwen-image-edit").name("low")) == 0
    finally:
        celery.close()


def test_a_terminal_webhook_is_asked_for_in_the_terminal_transition_itself() -> None:
    p = Pipelined()
    p.transitions.terminal_message = lambda job_id, event: ("webhooks", f"{job_id} {event}")
    started = p.submit("a")
    p.runner.run(started.id)
    p.settle()
    assert p.job(started.id).status is JobStatus.SUCCEEDED
    assert p.store.pushed == [("webhooks", f"{started.id} job.succeeded")]
    assert p.notified == []  # not sent a second time after the transition


@pytest.mark.parametrize(("lead_s", "steps_done_at_return"), [(1.0, 1), (0.1, 2)])
def test_the_next_job_is_taken_only_once_the_render_is_within_its_lead_of_the_end(
        lead_s: float, steps_done_at_return: int) -> None:
    p = Pipelined()
    p.runner.config = RunnerConfig(worker_name="w@test", heartbeat_interval_s=0.05, lease_s=30, lane_lead_s=lead_s)
    p.runner.renderer.step_sleep_s = 0.3  # type: ignore[attr-defined]  # 2 steps: 0.3 s left after the first
    job = p.submit("a")
    assert p.runner.run(job.id) is JobStatus.RUNNING
    assert p.job(job.id).progress.step == steps_done_at_return
    p.settle()


def test_with_no_job_waiting_the_task_returns_only_when_its_render_ends() -> None:
    p = Pipelined()
    p.queue.waiting = lambda: False
    p.runner.renderer.step_sleep_s = 0.2  # type: ignore[attr-defined]
    job = p.submit("a")
    assert p.runner.run(job.id) is JobStatus.RUNNING
    assert p.job(job.id).progress.step == 2  # not returned at step 1, although within the lead
    p.settle()
    assert p.job(job.id).status is JobStatus.SUCCEEDED


def test_jobs_waiting_sees_render_messages_no_worker_has_taken(redis_client: Any) -> None:
    from broker.celery_app import RENDER_QUEUES

    queue = CeleryRenderQueue(redis_client=redis_client, celery=None)
    assert queue.jobs_waiting() is False
    redis_client.lpush(RENDER_QUEUES["low"], "a message")
    assert queue.jobs_waiting() is True


def test_starting_a_pipelining_runs_its_render_and_finisher_threads_before_any_job() -> None:
    before = set(threading.enumerate())
    Pipelining().start()
    started = {t.name for t in set(threading.enumerate()) - before}
    assert any(name.startswith("render") for name in started)
    assert any(name.startswith("finisher") for name in started)


def test_warming_the_job_path_survives_an_unreachable_redis_and_object_store() -> None:
    import redis

    from workers.services import WorkerServices
    from workers.settings import WorkerSettings

    class DownRedis:
        def ping(self) -> None:
            raise redis.ConnectionError("down")

    class DownObjects:
        def check(self) -> None:
            raise StorageUnavailable("down")

    made: list[Pipelining] = []

    class CountingPipelining(Pipelining):
        def start(self) -> None:
            made.append(self)
            super().start()

    services = WorkerServices.connect(WorkerSettings(redis_url="redis://127.0.0.1:9/0"), celery=None)
    services.redis, services.objects = DownRedis(), DownObjects()  # type: ignore[assignment]
    services.pipelining = CountingPipelining()
    services.warm_job_path()
    assert len(made) == 1
