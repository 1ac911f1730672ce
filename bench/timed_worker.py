"""The render worker's Celery app with the bench-only timed stand-in: ``celery -A bench.timed_worker:app``.

Exactly ``workers.celery_worker`` (same tasks, signals, runner, services), except that the
process's renderer is :class:`bench.timed_standin.TimedStandinRenderer` (given to the pool
child's ``WorkerServices`` instead of the model). Needs
``EDITFARM_BENCH_RENDER_LOG`` (a folder); ``EDITFARM_STANDIN_RENDER_S`` and
``EDITFARM_BENCH_OUTPUT_SIDE`` are optional. Each render task's entry and return times are logged
too. Whether the worker pipelines (background finish, input prefetch) is the worker's own setting:
see ``bench.common.RUNNER_ENV``.
"""

from __future__ import annotations

import json
import os
import time

from bench.timed_standin import TimedStandinRenderer
from workers import celery_worker
from workers.services import WorkerServices
from workers.settings import WorkerSettings

app = celery_worker.app

_build_services = celery_worker.build_services


def _timed_services(settings: WorkerSettings, role: str) -> WorkerServices:
    """The worker's services, its renderer the timed stand-in (made in the pool child like the
    model; it holds no device), each render task's entry and return times logged (to take the gap
    between renders apart)."""
    if role != "render":
        return _build_services(settings, role)
    renderer = TimedStandinRenderer(
        float(os.environ.get("EDITFARM_STANDIN_RENDER_S", "0") or 0),
        os.environ["EDITFARM_BENCH_RENDER_LOG"],
        int(os.environ.get("EDITFARM_BENCH_OUTPUT_SIDE", "0") or 0),
    )
    services = WorkerServices.for_render(settings, celery=app, renderer=renderer)
    runner = services.runner
    assert runner is not None
    run = runner.run

    def timed_run(job_id: str):  # type: ignore[no-untyped-def]
        entered = time.time()
        try:
            return run(job_id)
        finally:
            folder = os.environ["EDITFARM_BENCH_RENDER_LOG"]
            with open(os.path.join(folder, f"{os.getpid()}.tasks.jsonl"), "a") as f:
                f.write(json.dumps({"job": job_id, "entered": entered, "returned": time.time()}) + "\n")

    runner.run = timed_run  # type: ignore[method-assign]
    return services


celery_worker.build_services = _timed_services
