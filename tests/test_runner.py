"""The runner's state machine, with in-memory stand-ins (unit level; the real path is in test_e2e_*)."""

from __future__ import annotations

import io
import time

import pytest
import redis
from PIL import Image

from broker.events import InMemoryEventPublisher
from broker.jobstore import InMemoryJobStore
from broker.schema import Job, JobParams, JobStatus, new_job_id
from editfarm_testing.workers import FakeRenderer, RecordingQueue
from storage import InMemoryObjectStore
from workers.pipeline.base import Previews
from workers.runner import RetryLater, Runner, RunnerConfig
from workers.transitions import Transitions


class Harness:
    def __init__(self, **config: float) -> None:
        self.store = InMemoryJobStore()
        self.objects = InMemoryObjectStore()
        self.events = InMemoryEventPublisher()
        self.renderer = FakeRenderer()
        self.notified: list[Job] = []
        self.webhook_events: list[str] = []
        self.queue = RecordingQueue()
        self.requeued = self.queue.requeued
        self.drain = False
        runner_config = RunnerConfig(worker_name="w@test", **config)  # type: ignore[arg-type]
        self.transitions = Transitions(store=self.store, publisher=self.events, notify=self._notify,
                                       config=runner_config)
        self.runner = Runner(transitions=self.transitions, objects=self.objects, renderer=self.renderer,
                             queue=self.queue, config=runner_config, draining=lambda: self.drain)

    def _notify(self, job: Job, event: str) -> None:
        self.webhook_events.append(event)
        if event in ("job.succeeded", "job.failed", "job.canceled"):
            self.notified.append(job)

    def submit(self, steps: int = 3, params: dict[str, object] | None = None, **fields: object) -> Job:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), "white").save(buf, format="PNG")
        job_params = JobParams(**{"prompt": "p", "seed": 7, "steps": steps,  # type: ignore[arg-type]
                                  "webhook": "https://hooks.example/x", **(params or {})})
        job = Job(id=new_job_id(), tenant="acme", params=job_params,
                  input_keys=["in/0.png"], **fields)  # type: ignore[arg-type]
        self.objects.put("in/0.png", buf.getvalue(), "image/png")
        self.store.create(job)
        return job

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        assert job is not None
        return job


def test_a_queued_job_renders_uploads_and_succeeds_with_one_notification() -> None:
    h = Harness()
    job = h.submit()
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED
    done = h.job(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 1
    assert done.progress.step == 3 and done.started_at and done.finished_at
    [out] = done.outputs
    assert (out.width, out.height) == (64, 48)
    assert Image.open(io.BytesIO(h.objects.get(out.key))).size == (64, 48)
    assert [j.status for j in h.notified] == [JobStatus.SUCCEEDED]
    kinds = [e["type"] for e in h.events.events]
    assert kinds.count("progress") == 3 and kinds[0] == "status"


def test_a_job_of_another_model_is_sent_to_its_own_queue_never_rendered_here() -> None:
    h = Harness()
    h.runner.model = "qwen-image-edit"
    other = h.submit(params={"model": "qwen-image"})
    assert h.runner.run(other.id) is JobStatus.QUEUED
    assert h.renderer.calls == 0 and h.job(other.id).status is JobStatus.QUEUED
    assert h.requeued == [other.id]  # CeleryRenderQueue sends it on its own model's queues
    mine = h.submit(params={"model": "qwen-image-edit"})
    assert h.runner.run(mine.id) is JobStatus.SUCCEEDED


def test_a_duplicate_delivery_of_a_finished_job_renders_nothing() -> None:
    h = Harness()
    job = h.submit()
    h.runner.run(job.id)
    h.runner.run(job.id)
    assert h.renderer.calls == 1 and len(h.notified) == 1


def test_an_unreadable_input_fails_the_job_with_input_unreadable() -> None:
    h = Harness()
    job = h.submit()
    h.objects.put("in/0.png", b"not an image", "image/png")
    assert h.runner.run(job.id) is JobStatus.FAILED
    assert h.job(job.id).error.code == "input_unreadable"  # type: ignore[union-attr]
    assert h.renderer.calls == 0 and len(h.notified) == 1


def test_a_render_error_fails_the_job_and_not_the_worker() -> None:
    h = Harness()
    h.renderer.error = RuntimeError("boom")
    job = h.submit()
    assert h.runner.run(job.id) is JobStatus.FAILED
    assert h.job(job.id).error.code == "render_failed"  # type: ignore[union-attr]


def test_a_job_running_under_a_live_lease_is_not_run_twice() -> None:
    h = Harness()
    job = h.submit()
    h.store.transition(job.id, JobStatus.RUNNING, {"worker": "other", "lease_until": time.time() + 30,
                                                   "attempts": 1})
    with pytest.raises(RetryLater) as caught:
        h.runner.run(job.id)
    assert 29 < caught.value.delay_s < 31
    assert h.renderer.calls == 0


def test_a_job_whose_lease_lapsed_is_taken_over_and_counts_an_attempt() -> None:
    h = Harness()
    job = h.submit()
    h.store.transition(job.id, JobStatus.RUNNING, {"worker": "dead", "lease_until": time.time() - 1,
                                                   "attempts": 1})
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED
    assert h.job(job.id).attempts == 2


def test_a_job_that_killed_its_worker_too_often_fails_instead_of_looping() -> None:
    h = Harness(max_attempts=3)
    job = h.submit()
    h.store.transition(job.id, JobStatus.RUNNING, {"worker": "dead", "lease_until": time.time() - 1,
                                                   "attempts": 3})
    assert h.runner.run(job.id) is JobStatus.FAILED
    assert h.job(job.id).error.code == "worker_lost"  # type: ignore[union-attr]
    assert h.renderer.calls == 0 and len(h.notified) == 1


def test_storage_down_hands_the_job_back_for_a_retry() -> None:
    h = Harness()
    job = h.submit()
    h.renderer.on_each_step = lambda step: setattr(h.objects, "down", step == 3)
    with pytest.raises(RetryLater):
        h.runner.run(job.id)
    again = h.job(job.id)
    assert again.status is JobStatus.QUEUED and again.outputs == [] and not h.notified
    h.objects.down = False
    h.renderer.on_each_step = None
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED


def test_a_job_ended_by_someone_else_mid_render_stops_at_the_next_step() -> None:
    h = Harness()
    job = h.submit(steps=5)
    h.renderer.on_each_step = lambda step: step == 2 and h.store.transition(job.id, JobStatus.CANCELED)
    assert h.runner.run(job.id) is JobStatus.CANCELED
    assert h.job(job.id).progress.step == 1
    assert not h.notified  # the canceler owns that transition's side effects


def test_the_lease_is_renewed_while_a_long_render_runs() -> None:
    h = Harness(lease_s=0.5, heartbeat_interval_s=0.05)
    h.renderer.step_sleep_s = 0.3
    job = h.submit(steps=4)
    leases: list[float] = []
    h.renderer.on_each_step = lambda step: leases.append(h.job(job.id).lease_until or 0)
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED
    assert leases[-1] > leases[0] + 0.5


def test_a_job_running_past_its_timeout_fails_with_code_timeout() -> None:
    h = Harness()
    h.renderer.step_sleep_s = 0.1
    job = h.submit(steps=20, params={"timeout_s": 0.25})
    assert h.runner.run(job.id) is JobStatus.FAILED
    done = h.job(job.id)
    assert done.error.code == "timeout" and done.progress.step < 20  # type: ignore[union-attr]
    assert len(h.notified) == 1


def test_a_job_not_started_before_its_queue_deadline_is_canceled_without_rendering() -> None:
    h = Harness()
    job = h.submit(params={"queue_deadline_s": 5.0}, created_at=time.time() - 10)
    assert h.runner.run(job.id) is JobStatus.CANCELED
    assert h.job(job.id).error.code == "queue_deadline"  # type: ignore[union-attr]
    assert h.renderer.calls == 0 and len(h.notified) == 1


def test_a_draining_worker_hands_its_job_back_and_requeues_it() -> None:
    h = Harness()
    job = h.submit(steps=5)
    h.renderer.on_each_step = lambda step: setattr(h, "drain", step >= 2)
    assert h.runner.run(job.id) is JobStatus.QUEUED
    back = h.job(job.id)
    assert back.status is JobStatus.QUEUED and back.worker is None
    assert h.requeued == [job.id] and not h.notified
    h.drain = False
    h.renderer.on_each_step = None
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED and h.job(job.id).attempts == 2


def test_out_of_memory_fails_the_job_with_its_own_code() -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    h = Harness()
    h.renderer.error = OutOfMemoryError("CUDA out of memory")
    job = h.submit()
    assert h.runner.run(job.id) is JobStatus.FAILED
    assert h.job(job.id).error.code == "out_of_memory"  # type: ignore[union-attr]


def test_a_device_that_fails_its_health_check_after_an_error_ends_the_process() -> None:
    from workers.runner import GpuBroken

    h = Harness()
    h.renderer.error = RuntimeError("CUDA error: an illegal memory access")
    h.renderer.healthcheck = lambda: (_ for _ in ()).throw(RuntimeError("still broken"))  # type: ignore[method-assign]
    job = h.submit()
    with pytest.raises(GpuBroken):
        h.runner.run(job.id)
    assert h.job(job.id).status is JobStatus.FAILED  # the job is ended before the process goes


def test_started_and_progress_webhooks_go_out_only_when_subscribed() -> None:
    h = Harness(progress_webhook_interval_s=0.0)
    quiet = h.submit(steps=3)
    h.runner.run(quiet.id)
    assert h.webhook_events == ["job.succeeded"]
    h.webhook_events.clear()
    chatty = h.submit(steps=3, params={"webhook_events": ["started", "progress", "completed"]})
    h.runner.run(chatty.id)
    assert h.webhook_events == ["job.started", "job.progress", "job.progress", "job.succeeded"]


def test_a_job_without_a_webhook_notifies_nobody() -> None:
    h = Harness()
    job = h.submit(params={"webhook": None})
    h.runner.run(job.id)
    assert h.webhook_events == []


def test_previews_are_stored_and_announced_every_n_steps() -> None:
    class PreviewingRenderer(FakeRenderer):
        asked: list[Previews | None] = []

        def render(self, request, on_step=None, *, previews=None):  # type: ignore[no-untyped-def]
            self.asked.append(previews)

            def step_hook(step: int) -> None:
                if previews and step % previews.every_n_steps == 0 and step < request.steps:
                    previews.sink(step, Image.new("RGB", (8, 8), "red"))
            self.on_each_step = step_hook
            return super().render(request, on_step)

    h = Harness(preview_every_n_steps=2)
    h.runner.renderer = h.renderer = PreviewingRenderer()
    job = h.submit(steps=5)
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED
    previews = [e["data"] for e in h.events.events if e["type"] == "preview"]
    assert [p["step"] for p in previews] == [2, 4]
    for preview in previews:
        assert Image.open(io.BytesIO(h.objects.get(preview["key"]))).format == "JPEG"
        assert preview["key"].startswith(f"tenants/acme/jobs/{job.id}/")
    assert [p.every_n_steps if p else None for p in h.renderer.asked] == [2]  # type: ignore[attr-defined]


def test_with_previews_off_a_render_is_asked_for_none() -> None:
    h = Harness()
    seen: list[object] = []
    original = h.renderer.render

    def render(request, on_step=None, *, previews=None):  # type: ignore[no-untyped-def]
        seen.append(previews)
        return original(request, on_step, previews=previews)

    h.renderer.render = render  # type: ignore[method-assign]
    job = h.submit(steps=4)
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED
    assert seen == [None] and not [e for e in h.events.events if e["type"] == "preview"]


class _StoreDownFor:
    """Wraps a job store so its first ``calls`` reads raise a Redis connection error."""

    def __init__(self, store: InMemoryJobStore, calls: int) -> None:
        self._store, self.left = store, calls

    def get(self, job_id: str) -> Job | None:
        if self.left > 0:
            self.left -= 1
            raise redis.exceptions.ConnectionError("Connection refused")
        return self._store.get(job_id)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_delivery_waits_out_a_job_store_outage_and_then_runs_the_job_once() -> None:
    h = Harness()
    job = h.submit()
    h.transitions.store = _StoreDownFor(h.store, calls=3)  # type: ignore[assignment]
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED
    assert h.job(job.id).attempts == 1 and h.renderer.calls == 1


def test_a_delivery_gives_up_on_a_job_store_that_stays_down() -> None:
    h = Harness(store_outage_wait_s=0.3)
    job = h.submit()
    h.transitions.store = _StoreDownFor(h.store, calls=10_000)  # type: ignore[assignment]
    with pytest.raises(redis.exceptions.ConnectionError):
        h.runner.run(job.id)
    assert h.renderer.calls == 0


def test_progress_is_written_at_most_once_per_interval_and_always_at_the_last_step() -> None:
    h = Harness(progress_interval_s=10.0)
    job = h.submit(steps=5)
    assert h.runner.run(job.id) is JobStatus.SUCCEEDED
    steps = [e["data"]["step"] for e in h.events.events if e["type"] == "progress"]
    assert steps == [1, 5]
