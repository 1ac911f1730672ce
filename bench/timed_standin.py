"""A bench-only render stand-in that logs when it held the "device": the exact rendering intervals.

``TimedStandinRenderer`` is ``workers.standin.StandinRenderer`` (sleeps ``render_s`` per job,
spread over the steps, with the same step callbacks) plus:

* after each render it appends ``{"pid", "seed", "start", "end"}`` (epoch seconds,
  ``time.time()`` like the job records) as one JSON line to
  ``$EDITFARM_BENCH_RENDER_LOG/<pid>.jsonl``, outside the timed interval;
* with ``EDITFARM_BENCH_OUTPUT_SIDE=N`` it returns an N x N image of noise instead of a flat
  colour, so the worker's PNG encode and upload cost what a real (or worse) output costs.

Selected by running the worker as ``celery -A bench.timed_worker:app`` (see that module).
Never used outside ``bench/``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from PIL import Image

from workers.pipeline.base import Previews, RenderRequest, StepCallback
from workers.standin import StandinRenderer


class TimedStandinRenderer(StandinRenderer):
    def __init__(self, render_s: float, log_dir: str, output_side: int = 0) -> None:
        super().__init__(render_s)
        self.log_dir = Path(log_dir)
        self.output_side = output_side
        self._noise: Image.Image | None = None

    def _noise_image(self) -> Image.Image:
        if self._noise is None:  # made once, outside any render
            import numpy as np

            side = self.output_side
            pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
            self._noise = Image.fromarray(pixels, "RGB")
        return self._noise

    def warmup(self) -> None:
        if self.output_side:
            self._noise_image()

    def render(self, request: RenderRequest, on_step: StepCallback | None = None, *,
               previews: Previews | None = None) -> list[Image.Image]:
        start = time.time()
        images = super().render(request, on_step, previews=previews)
        if self.output_side:
            images = [self._noise_image().copy() for _ in images]
        end = time.time()
        with open(self.log_dir / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "seed": request.seed, "start": start, "end": end}) + "\n")
        return images
