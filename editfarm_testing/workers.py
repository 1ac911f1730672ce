"""Stand-ins for a render worker's collaborators in unit tests (the real path runs in test_e2e_*),
and what tests read on the worker's own parts.

:func:`finisher_busy` takes the :class:`~workers.pipelining.Finisher` rather than being a property
on it: the worker only ever waits for its finisher.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PIL import Image

from broker.schema import Job
from workers.pipeline.base import Renderer, RenderInterrupted, RenderRequest
from workers.pipelining import Finisher


def finisher_busy(finisher: Finisher) -> bool:
    """Whether a finish submitted to ``finisher`` is still running."""
    pending = finisher._pending
    return pending is not None and not pending.done()


class FakeRenderer(Renderer):
    """Returns a solid image the size of the input; can be told to fail or to run a hook per step."""

    device = "cpu"

    def __init__(self) -> None:
        self.calls = 0
        self.error: Exception | None = None
        self.on_each_step: Callable[[int], None] | None = None
        self.step_sleep_s = 0.0

    def render(self, request: RenderRequest, on_step=None, *, previews=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.error:
            raise self.error
        for step in range(1, request.steps + 1):
            time.sleep(self.step_sleep_s)
            if self.on_each_step:
                self.on_each_step(step)
            if on_step and not on_step(step, request.steps):
                raise RenderInterrupted(step, request.steps)
        return [Image.new("RGB", request.images[0].size, (request.seed % 255, 0, 0))]

    def healthcheck(self) -> None:
        pass

    def warmup(self) -> None:
        pass


class RecordingQueue:
    """The runner's WorkQueue in unit tests: records re-sent jobs; ``give_way_to(job)`` and
    ``waiting()`` answer give_way and jobs_waiting (never, and always, unless replaced)."""

    def __init__(self) -> None:
        self.requeued: list[str] = []
        self.give_way_to: Callable[[Job], bool] = lambda job: False
        self.waiting: Callable[[], bool] = lambda: True

    def requeue(self, job: Job) -> None:
        self.requeued.append(job.id)

    def give_way(self, job: Job) -> bool:
        return self.give_way_to(job)

    def jobs_waiting(self) -> bool:
        return self.waiting()
