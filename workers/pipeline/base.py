"""Plain-Python types shared by the worker and the pipeline adapters.

Deliberately free of torch/diffusers imports: the Celery parent process, the API and the
tests import these types without paying for (or initialising) a deep-learning stack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

__all__ = [
    "MAX_SEED",
    "OPERATIONS",
    "RenderInterrupted",
    "RenderRequest",
    "Renderer",
    "StepCallback",
]

# Operations a renderer may be asked for. Only image editing exists today.
OPERATIONS: tuple[str, ...] = ("edit",)
# torch.Generator.manual_seed takes an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1

# (steps_done, total_steps) -> keep_going. steps_done counts from 1, so the last call of an
# uninterrupted N-step render is (N, N). Returning False cancels the render.
StepCallback = Callable[[int, int], bool]


@dataclass(frozen=True)
class RenderRequest:
    """One render job, in pipeline terms.

    Attributes:
        operation: what to do; one of ``OPERATIONS`` ("edit").
        prompt: the edit instruction.
        negative_prompt: text to steer away from; ``None`` means none given.
        steps: denoising steps (>= 1).
        true_cfg_scale: classifier-free guidance scale (>= 0); CFG is active only above 1.0,
            and then costs a second transformer pass per step.
        seed: RNG seed in ``[0, MAX_SEED]``; the same seed gives the same image on one device.
        images: the input image(s); converted to RGB by the renderer.
        num_images: how many outputs to produce from the one request (>= 1).

    Raises:
        ValueError: from ``__post_init__`` when a field is out of range.
    """

    operation: str
    prompt: str
    negative_prompt: str | None
    steps: int
    true_cfg_scale: float
    seed: int
    images: list[Image.Image] = field(repr=False)
    num_images: int = 1

    def __post_init__(self) -> None:
        if self.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {self.operation!r}; expected one of {OPERATIONS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**64 - 1], got {self.seed}")
        if self.true_cfg_scale < 0:
            raise ValueError(f"true_cfg_scale must be >= 0, got {self.true_cfg_scale}")
        if self.operation == "edit" and len(self.images) != 1:
            raise ValueError(f"an edit takes exactly one input image, got {len(self.images)}")


class RenderInterrupted(Exception):
    """The step callback returned False: the job was canceled mid-render.

    Attributes:
        steps_done: steps completed when the render stopped (1-based, as passed to the callback).
        total_steps: steps the render would have run.
    """

    def __init__(self, steps_done: int, total_steps: int) -> None:
        super().__init__(f"render canceled after step {steps_done}/{total_steps}")
        self.steps_done = steps_done
        self.total_steps = total_steps


class Renderer(ABC):
    """A loaded model on one device. Not thread-safe: run one render at a time per instance.

    Attributes:
        device: the torch device string the model lives on, e.g. "cpu" or "cuda:0".
    """

    device: str

    @abstractmethod
    def render(self, request: RenderRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        """Run ``request`` and return ``request.num_images`` RGB images.

        ``on_step`` is called after every denoising step; if it returns False the render stops
        and ``RenderInterrupted`` is raised. Exceptions raised by ``on_step`` propagate.

        Raises:
            RenderInterrupted: the callback asked to stop.
            ValueError: the request is not supported by this renderer.
        """

    @abstractmethod
    def healthcheck(self) -> None:
        """Run a tiny real tensor op on ``device`` (milliseconds).

        Raises:
            RuntimeError: the device is unusable or computed a wrong result.
        """

    @abstractmethod
    def warmup(self) -> None:
        """One short render so the first real job does not pay one-off costs (kernel selection,
        allocator growth, lazy imports). Seconds on GPU; raises whatever a render would."""
