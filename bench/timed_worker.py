"""The render worker's Celery app with the bench-only timed stand-in: ``celery -A bench.timed_worker:app``.

Exactly ``workers.celery_worker`` (same tasks, signals, runner, services), except that the
process's renderer is set to :class:`bench.timed_standin.TimedStandinRenderer` before the
prefork pool forks (it holds no device and no connections, so it may be inherited). Needs
``EDITFARM_BENCH_RENDER_LOG`` (a folder); ``EDITFARM_STANDIN_RENDER_S`` and
``EDITFARM_BENCH_OUTPUT_SIDE`` are optional. ``EDITFARM_BENCH_RUNNER=pipelined`` swaps in the
prototype of the proposed runner change (``bench.pipelined``).
"""

from __future__ import annotations

import os

from bench.timed_standin import TimedStandinRenderer
from workers import celery_worker, services

app = celery_worker.app

services._renderer = TimedStandinRenderer(
    float(os.environ.get("EDITFARM_STANDIN_RENDER_S", "0") or 0),
    os.environ["EDITFARM_BENCH_RENDER_LOG"],
    int(os.environ.get("EDITFARM_BENCH_OUTPUT_SIDE", "0") or 0),
)

if os.environ.get("EDITFARM_BENCH_RUNNER") in ("current", "pipelined"):
    # current: the runner as it is, its tasks' entry/return times logged; pipelined: the prototype of
    # the proposed runner change (bench/pipelined.py). Same Runner object, its class swapped.
    from celery.signals import worker_process_shutdown

    from bench import pipelined

    _make_runner = services.runner
    _class = pipelined.PipelinedRunner if os.environ["EDITFARM_BENCH_RUNNER"] == "pipelined" else pipelined.TimedRunner

    def _bench_runner():  # type: ignore[no-untyped-def]
        runner = _make_runner()
        runner.__class__ = _class
        return runner

    services.runner = _bench_runner  # type: ignore[assignment]

    @worker_process_shutdown.connect
    def _finish_last_job(**_: object) -> None:
        pipelined.state()[0].wait()
