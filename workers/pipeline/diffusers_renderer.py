"""``Renderer`` backed by ``diffusers.QwenImageEditPipeline``.

Import-safe in a Celery prefork parent: this module imports torch only. ``import diffusers``
calls ``torch.cuda.is_available()`` at import time (``diffusers.utils.torch_utils``), which
initialises the CUDA driver and can break CUDA in forked children, so diffusers is imported
inside ``DiffusersRenderer.load`` — i.e. in the worker child, after the fork.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .base import Renderer, RenderInterrupted, RenderRequest, StepCallback

__all__ = ["DiffusersRenderer", "resolve_dtype"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Substituted for a missing negative prompt when CFG is requested: diffusers silently disables
# CFG without one, and the Qwen-Image-Edit reference usage passes a single space.
_EMPTY_NEGATIVE_PROMPT = " "


def resolve_dtype(device: str, dtype: str | None) -> torch.dtype:
    """The weight dtype for ``device``: ``dtype`` if given, else bf16 on CUDA, float32 elsewhere
    (CPU bf16 matmuls are slow and CPU fp16 is partly unsupported).

    Raises:
        ValueError: ``dtype`` is not one of float32/fp32/bfloat16/bf16/float16/fp16.
    """
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: diffusers renamed ``torch_dtype`` to ``dtype`` (the
    old name now warns) and older releases ignore ``dtype``; detect which this one takes."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


class DiffusersRenderer(Renderer):
    """A ``QwenImageEditPipeline`` loaded once and kept on ``device``. Use ``load`` to build.

    Attributes:
        device: torch device string, e.g. "cpu", "cuda", "cuda:1".
        dtype: weight dtype.
        model: the path or hub id the weights came from.
        pipe: the underlying ``diffusers.QwenImageEditPipeline`` (typed ``Any``: importing
            diffusers for the annotation would defeat the lazy import, and mypy sees its
            lazily-exported classes as opaque anyway).
    """

    def __init__(self, pipe: Any, model: str, device: str, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.model = model
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(cls, model: str, device: str = "cpu", dtype: str | None = None) -> DiffusersRenderer:
        """Load the pipeline from ``model`` (a local folder or hub id) and move it to ``device``.

        ``dtype`` is a name as accepted by ``resolve_dtype``; default bf16 on CUDA, float32
        elsewhere. Takes seconds (tiny model) to minutes (real 20B weights, ~58 GB in bf16).

        Raises:
            ValueError: unknown ``dtype``.
            RuntimeError: ``device`` is malformed or unavailable (from torch).
            OSError: ``model`` is missing or incomplete (from diffusers/huggingface_hub).
        """
        torch_dtype = resolve_dtype(device, dtype)
        # Fail on a malformed or absent device before the slow load, not after it.
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")

        from diffusers import QwenImageEditPipeline

        pipe: Any = QwenImageEditPipeline.from_pretrained(model, **{_dtype_kwarg(): torch_dtype})
        pipe.to(device)
        # tqdm bars would interleave in worker logs; progress is reported through on_step.
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, model=model, device=device, dtype=torch_dtype)

    def render(self, request: RenderRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        """Run one edit; returns ``request.num_images`` RGB images.

        Output size is chosen by the pipeline, not by the input: about 1 megapixel (1024*1024)
        with the input's aspect ratio, sides multiples of 32 (a 64x64 input gives 1024x1024,
        a 3:2 input 1248x832). Noise comes from a CPU generator seeded with ``request.seed``,
        so on CPU the same request gives byte-identical images; on GPU the same seed gives the
        same starting noise on every card, but kernels may differ in the last bits.

        Raises:
            RenderInterrupted: ``on_step`` returned False (the VAE decode is skipped).
            ValueError: unsupported ``request.operation`` or image count, or a 1-step request
                to a scheduler with ``shift_terminal`` (see below).
        """
        if request.operation != "edit":
            raise ValueError(f"{type(self).__name__} cannot do {request.operation!r}")
        if len(request.images) != 1:
            raise ValueError(f"an edit takes exactly one input image, got {len(request.images)}")
        if request.steps < 2 and self.pipe.scheduler.config.get("shift_terminal"):
            # The pipeline's sigmas for 1 step are [1.0]; stretching them to shift_terminal
            # (0.02 in the real Qwen-Image config) divides 0 by 0, and the image comes out NaN
            # (black) with only a RuntimeWarning. Refuse instead of returning garbage.
            raise ValueError("this model's scheduler needs at least 2 steps (shift_terminal is set)")
        image = request.images[0]
        if image.mode != "RGB":
            image = image.convert("RGB")
        negative_prompt = request.negative_prompt
        if negative_prompt is None and request.true_cfg_scale > 1.0:
            negative_prompt = _EMPTY_NEGATIVE_PROMPT

        def on_step_end(
            pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            total = pipe.num_timesteps
            if on_step is not None and not on_step(step_index + 1, total):
                pipe._interrupt = True
                # Raise here instead of letting the loop run out: after an interrupted loop the
                # pipeline still VAE-decodes the half-denoised latents (seconds of wasted work on
                # a canceled job). Unwinding is clean: the pipeline resets its state per call.
                raise RenderInterrupted(step_index + 1, total)
            return callback_kwargs

        output = self.pipe(
            image=image,
            prompt=request.prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=request.steps,
            true_cfg_scale=request.true_cfg_scale,
            num_images_per_prompt=request.num_images,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
        if getattr(self.pipe, "_interrupt", False):
            # Only reachable if a future diffusers swallows callback exceptions.
            raise RenderInterrupted(request.steps, request.steps)
        return list(output.images)

    def healthcheck(self) -> None:
        """Multiply a 4x4 matrix on ``self.device``, check the result against the host, and
        check the transformer weights are still on ``self.device`` (milliseconds).

        Raises:
            RuntimeError: the op failed (e.g. CUDA error, device lost), gave a wrong answer, or
                the weights have moved.
        """
        host = torch.arange(16, dtype=torch.float32).reshape(4, 4)
        on_device = host.to(self.device)
        got = (on_device @ on_device).sum().item()  # .item() waits for the device
        expected = (host @ host).sum().item()  # small integers: exact in float32 (and TF32)
        if got != expected:
            raise RuntimeError(f"healthcheck on {self.device} computed {got}, expected {expected}")
        weights_on = next(self.pipe.transformer.parameters()).device
        if weights_on.type != torch.device(self.device).type:
            raise RuntimeError(f"transformer weights are on {weights_on}, expected {self.device}")

    def warmup(self) -> None:
        """A 2-step edit (1 step is refused, see ``render``) of a 64x64 grey image without CFG;
        the result is discarded. Still encodes/decodes at ~1 MP like any edit."""
        self.render(
            RenderRequest(
                operation="edit",
                prompt="warm up",
                negative_prompt=None,
                steps=2,
                true_cfg_scale=1.0,
                seed=0,
                images=[Image.new("RGB", (64, 64), (128, 128, 128))],
            )
        )
