"""How a worker process is wired: the runner's and the reaper's collaborators given explicitly,
WorkerServices built per process (never in the Celery parent at import), heartbeat and drain.

Unit level with in-memory stores, and a real Redis for the heartbeat and drain keys."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from broker import keys
from broker.events import InMemoryEventPublisher
from broker.jobstore import InMemoryJobStore
from broker.schema import Job, JobParams, JobStatus, new_job_id
from cli.cluster import ROOT
from editfarm_testing.workers import FakeRenderer, RecordingQueue
from storage import InMemoryObjectStore
from workers.lifecycle import Drain, Heartbeat
from workers.reaper import Reaper
from workers.runner import Runner, RunnerConfig
from workers.services import WorkerServices
from workers.settings import WorkerSettings
from workers.transitions import Transitions


def _transitions(store: InMemoryJobStore, pushed_with_terminal: bool = False) -> Transitions:
    return Transitions(store=store, publisher=InMemoryEventPublisher(), notify=lambda job, event: None,
                       config=RunnerConfig(worker_name="w@test"),
                       terminal_message=(lambda job_id, event: ("webhooks", f"{job_id} {event}"))
                       if pushed_with_terminal else None)


def test_the_runner_takes_its_collaborators_by_keyword_only() -> None:
    store = InMemoryJobStore()
    transitions = _transitions(store)
    args: list[Any] = [transitions, InMemoryObjectStore(), FakeRenderer(), RecordingQueue(),
                       RunnerConfig(worker_name="w@test")]
    with pytest.raises(TypeError):
        Runner(*args)
    runner = Runner(transitions=args[0], objects=args[1], renderer=args[2], queue=args[3], config=args[4])
    assert runner.store is store and not isinstance(runner, Transitions)


def test_the_reaper_resends_a_lapsed_job_once_and_expires_an_overdue_one_without_a_model() -> None:
    store, queue = InMemoryJobStore(), RecordingQueue()
    now = time.time()
    lapsed = Job(id=new_job_id(), tenant="acme", params=JobParams(prompt="p", seed=1), created_at=now - 100)
    overdue = Job(id=new_job_id(), tenant="acme", params=JobParams(prompt="p", seed=1, queue_deadline_s=10,
                                                                   webhook="https://hooks.example/x"),
                  created_at=now - 60)
    store.create(lapsed)
    store.create(overdue)
    assert store.transition(lapsed.id, JobStatus.RUNNING, {"worker": "w@gone", "lease_until": now - 5})
    claimed: set[tuple[str, float]] = set()

    def claim(job_id: str, lease_until: float) -> bool:
        first = (job_id, lease_until) not in claimed
        claimed.add((job_id, lease_until))
        return first

    reaper = Reaper(store=store, transitions=_transitions(store, pushed_with_terminal=True), queue=queue,
                    claim=claim)
    assert reaper.sweep(now) == {"requeued": 1, "expired": 1, "resent": 0}
    assert reaper.sweep(now) == {"requeued": 0, "expired": 0, "resent": 0}  # the lapse was claimed; the job ended
    assert queue.requeued == [lapsed.id]
    expired = store.get(overdue.id)
    assert expired is not None and expired.status is JobStatus.CANCELED
    assert expired.error is not None and expired.error.code == "queue_deadline"
    assert store.pushed == [("webhooks", f"{overdue.id} job.canceled")]  # its webhook, with the transition


def test_a_webhook_workers_services_have_no_model_and_connect_to_nothing_when_built() -> None:
    # ports 9 (discard) on loopback: nothing listens; building must not try
    settings = WorkerSettings(redis_url="redis://127.0.0.1:9/0", s3_endpoint_url="http://127.0.0.1:9")
    services = WorkerServices.connect(settings, celery=None)
    assert services.renderer is None and services.runner is None and services.pipelining is None
    assert services.reaper().transitions is services.transitions
    assert services.reaper().queue is services.queue


def test_a_render_workers_runner_shares_the_processes_transitions_queue_and_drain() -> None:
    settings = WorkerSettings(redis_url="redis://127.0.0.1:9/0", s3_endpoint_url="http://127.0.0.1:9",
                              renderer="standin")
    services = WorkerServices.for_render(settings, celery=None)
    runner = services.runner
    assert runner is not None and runner.renderer is services.renderer
    assert runner.transitions is services.transitions and runner.queue is services.queue
    assert runner.pipelining is services.pipelining and runner.objects is services.objects
    assert runner.draining == services.drain.draining


def test_importing_the_celery_app_builds_no_services_and_touches_no_cuda(tmp_path: Path) -> None:
    """What the prefork parent does: import the app. No services (connections, model) may exist
    then, and torch must not even be imported."""
    probe = (
        "import sys\n"
        "from workers import celery_worker\n"
        "assert celery_worker._services == {}, celery_worker._services\n"
        "assert 'torch' not in sys.modules, 'torch imported by the parent'\n"
        "assert {'editfarm.render', 'editfarm.notify', 'editfarm.webhook'} <= set(celery_worker.app.tasks)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'sdk'}", EDITFARM_WORKER_ROLE="render",
               EDITFARM_REDIS_URL="redis://127.0.0.1:9/0")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_heartbeat_writes_its_file_and_an_expiring_key(redis_client: redis.Redis, tmp_path: Path) -> None:
    file = tmp_path / "live" / "heartbeat"
    heartbeat = Heartbeat(redis_client=redis_client, process_name="gpu0@host", file=str(file), interval_s=2)
    heartbeat.beat()
    assert float(file.read_text()) == pytest.approx(time.time(), abs=5)
    assert redis_client.exists(keys.worker_heartbeat("gpu0@host"))
    assert 0 < redis_client.ttl(keys.worker_heartbeat("gpu0@host")) <= 13


def test_the_drain_window_is_read_from_redis_at_most_once_a_second(redis_client: redis.Redis) -> None:
    clock = [1000.0]
    key = Drain.key_for("gpu0@host", "inst1")
    main = Drain(redis_client=redis_client, key=key, timeout_s=30, clock=lambda: clock[0])
    child = Drain(redis_client=redis_client, key=key, timeout_s=30, clock=lambda: clock[0])
    assert child.draining() is False
    main.start()  # SIGTERM in the main process: 30 s from now
    clock[0] += 0.5
    assert child.draining() is False  # not read again yet; and the window is open anyway
    clock[0] += 31
    assert child.draining() is True
    other = Drain(redis_client=redis_client, key=Drain.key_for("gpu0@host", "inst2"), timeout_s=30,
                  clock=lambda: clock[0])
    assert other.draining() is False  # a restarted worker (new instance) does not inherit it
