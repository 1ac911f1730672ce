"""The render worker's Celery app with the bench-only timed stand-in: ``celery -A bench.timed_worker:app``.

Exactly ``workers.celery_worker`` (same tasks, signals, runner, services), except that the
process's renderer is set to :class:`bench.timed_standin.TimedStandinRenderer` before the
prefork pool forks (it holds no device and no connections, so it may be inherited). Needs
``EDITFARM_BENCH_RENDER_LOG`` (a folder); ``EDITFARM_STANDIN_RENDER_S`` and
``EDITFARM_BENCH_OUTPUT_SIDE`` are optional.
"""

from __future__ import annotations

import os

from bench.timed_standin import TimedStandinRenderer
from workers import celery_worker, services

app = celery_worker.app

services._renderer = TimedStandinRenderer(  # noqa: SLF001 - the one seam a bench-only renderer needs
    float(os.environ.get("EDITFARM_STANDIN_RENDER_S", "0") or 0),
    os.environ["EDITFARM_BENCH_RENDER_LOG"],
    int(os.environ.get("EDITFARM_BENCH_OUTPUT_SIDE", "0") or 0),
)
