"""The render stand-in: a Renderer with no model, for tests and benchmarks ONLY.

Selected with ``EDITFARM_RENDERER=standin``; it "holds the device" for
``EDITFARM_STANDIN_RENDER_S`` seconds per job (spread over the job's steps, with
the same step callbacks, cancel and timeout behaviour as the real renderer) and
returns flat images whose colour follows the seed. It measures and exercises
everything around the model — queues, leases, storage, webhooks — at no cost.
Production never uses it: the worker logs a warning when it is selected.
"""

from __future__ import annotations

import time

from PIL import Image

from workers.pipeline.base import Previews, Renderer, RenderInterrupted, RenderRequest, StepCallback


class StandinRenderer(Renderer):
    device = "standin"

    def __init__(self, render_s: float = 0.0) -> None:
        self.render_s = render_s

    def render(self, request: RenderRequest, on_step: StepCallback | None = None, *,
               previews: Previews | None = None) -> list[Image.Image]:
        """Flat images after ``render_s``; no previews (there are no latents to show)."""
        steps = max(1, request.steps)
        deadline = time.perf_counter()
        for step in range(1, steps + 1):
            deadline += self.render_s / steps
            # sleep to an absolute deadline so callback costs do not stretch the render
            delay = deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if on_step is not None and not on_step(step, steps):
                raise RenderInterrupted(step, steps)
        size = self._size(request)
        color = (request.seed % 251, (request.seed // 251) % 251, 128)
        return [Image.new("RGB", size, color) for _ in range(request.num_images)]

    @staticmethod
    def _size(request: RenderRequest) -> tuple[int, int]:
        width, height = getattr(request, "width", None), getattr(request, "height", None)
        if width and height:
            return int(width), int(height)
        if request.images:
            return request.images[0].size
        return 64, 64

    def healthcheck(self) -> None:
        pass

    def warmup(self) -> None:
        pass
