"""``Renderer`` backed by the diffusers Qwen-Image pipelines (edit, multi-image edit, text to
image, inpaint, img2img), all sharing one loaded set of weights.

Import-safe in a Celery prefork parent: this module imports torch (and numpy/PIL) only. ``import diffusers``
calls ``torch.cuda.is_available()`` at import time (``diffusers.utils.torch_utils``), which
initialises the CUDA driver and can break CUDA in forked children, so diffusers is imported
inside ``DiffusersRenderer.load`` — i.e. in the worker child, after the fork.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from workers import operations
from workers.operations import Sampling

from .base import Previews, Renderer, RenderInterrupted, RenderRequest, StepCallback
from .compile_watch import CompileWatch
from .lora import LoraCache
from .presets import FastPreset
from .profiles import MemoryProfile

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


def latent_preview(latents: Any, width: int | None, height: int | None, max_side_px: int = 128) -> Image.Image | None:
    """A rough RGB preview of packed Qwen-Image latents, without the VAE (milliseconds).

    The latents are ``[batch, (h/16)*(w/16), channels*4]`` (2x2 packing over the VAE's 8x grid);
    each token's 2x2 group is averaged and the first three latent channels are stretched to
    0..255. Returns None when the shape does not match ``width``x``height``.
    """
    if latents is None or not width or not height or latents.ndim != 3:
        return None
    grid_h, grid_w = int(height) // 16, int(width) // 16
    if latents.shape[1] != grid_h * grid_w or latents.shape[2] % 4:
        return None
    x = latents[0].detach().float().reshape(grid_h, grid_w, latents.shape[2] // 4, 4).mean(-1)[..., :3]
    low = x.amin(dim=(0, 1), keepdim=True)
    high = x.amax(dim=(0, 1), keepdim=True)
    rgb = ((x - low) / (high - low + 1e-6) * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
    image = Image.fromarray(rgb, "RGB")
    scale = max_side_px / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


class DiffusersRenderer(Renderer):
    """One Qwen-Image model loaded once and kept on ``device``; every operation runs on it.

    The loaded pipeline (``QwenImageEditPipeline``) is the base; the other pipelines
    (multi-image edit, text-to-image, inpaint, img2img) are made from it with ``from_pipe`` on
    first use and share its transformer, VAE, text encoder and tokenizer objects: one copy of
    the weights per process. Each gets its own scheduler (no weights, but mutable state).
    Use ``load`` to build.

    Attributes:
        device: torch device string, e.g. "cpu", "cuda", "cuda:1".
        dtype: weight dtype.
        model: the path or hub id the weights came from.
        pipe: the underlying ``diffusers.QwenImageEditPipeline`` (typed ``Any``: importing
            diffusers for the annotation would defeat the lazy import, and mypy sees its
            lazily-exported classes as opaque anyway).
        loras: the LoRA adapters loaded into the shared transformer.
    """

    def __init__(self, pipe: Any, model: str, device: str, dtype: torch.dtype, lora_capacity: int = 8) -> None:
        self.pipe = pipe
        self.model = model
        self.device = device
        self.dtype = dtype
        self.loras = LoraCache(pipe, capacity=lora_capacity)
        self._pipes: dict[str, Any] = {"edit": pipe}
        # the previews of the render under way (render's argument), read by each pipeline call's
        # step callback; None between renders
        self._previews: Previews | None = None
        self.profile = MemoryProfile()
        self.preset = FastPreset()
        self.compile_watch: CompileWatch | None = None

    @classmethod
    def load(cls, model: str, device: str = "cpu", dtype: str | None = None,
             lora_capacity: int = 8, *, profile: MemoryProfile | None = None, preset: FastPreset | None = None,
             on_recompile: Callable[[float], None] | None = None,
             allow_offload_on_cpu: bool = False) -> DiffusersRenderer:
        """Load the pipeline from ``model`` (a local folder or hub id) and place it on ``device``
        as ``profile`` says (default: every weight in ``dtype`` on ``device``), sped up as
        ``preset`` says (default: nothing).

        ``dtype`` is a name as accepted by ``resolve_dtype``; default bf16 on CUDA, float32
        elsewhere. Takes seconds (tiny model) to minutes (real 20B weights, ~58 GB in bf16).
        ``lora_capacity``: LoRA adapters kept loaded between jobs (see ``LoraCache``).
        ``on_recompile(seconds)``: called for every torch.compile after the warm-up.
        ``allow_offload_on_cpu``: tests and benchmarks only (see ``memory.apply_profile``).

        Raises:
            ValueError: unknown ``dtype``.
            ProfileError: ``device`` cannot do ``profile``, or torchao is missing.
            PresetError: a fused LoRA or scheduler override does not fit the model.
            RuntimeError: ``device`` is malformed or unavailable (from torch).
            OSError: ``model`` is missing or incomplete (from diffusers/huggingface_hub).
        """
        from .fast import fuse_and_schedule, speed_up
        from .memory import apply_profile

        profile = profile or MemoryProfile()
        preset = preset or FastPreset()
        torch_dtype = resolve_dtype(device, dtype)
        # Fail on a malformed or absent device, or a profile it cannot do, before the slow load.
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if not allow_offload_on_cpu:
            profile.check_device(torch.device(device).type)

        from diffusers import QwenImageEditPipeline

        pipe: Any = QwenImageEditPipeline.from_pretrained(model, **{_dtype_kwarg(): torch_dtype})
        fuse_and_schedule(pipe, preset)  # into the full-precision weights, before any cast
        apply_profile(pipe, profile, device, torch_dtype, allow_offload_on_cpu=allow_offload_on_cpu)
        # tqdm bars would interleave in worker logs; progress is reported through on_step.
        pipe.set_progress_bar_config(disable=True)
        renderer = cls(pipe, model=model, device=device, dtype=torch_dtype, lora_capacity=lora_capacity)
        renderer.profile, renderer.preset = profile, preset
        renderer.compile_watch = speed_up(pipe, preset, on_recompile)
        return renderer

    # -- the pipelines ---------------------------------------------------------------------------

    def pipeline(self, kind: str) -> Any:
        """The pipeline for ``kind`` ("edit", "edit_plus", "generate", "inpaint", "img2img"),
        made from the base pipeline on first use and cached. Shares every model object.

        Raises:
            ValueError: unknown ``kind``.
        """
        if kind in self._pipes:
            return self._pipes[kind]
        import diffusers

        class_name = _PIPELINE_CLASSES.get(kind)
        if class_name is None:
            raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {sorted(_PIPELINE_CLASSES)}")
        pipeline_class = getattr(diffusers, class_name)
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        # Built from the shared components directly, not with from_pipe: from_pipe always casts
        # the new pipeline to a dtype (float32 if none is given), in place on the shared modules,
        # which silently turns float8-stored weights back into full precision (and would double
        # a bf16 model given no dtype).
        wanted = inspect.signature(pipeline_class.__init__).parameters
        shared = {name: module for name, module in self.pipe.components.items() if name in wanted}
        pipe = pipeline_class(**{**shared, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        self._pipes[kind] = pipe
        return pipe

    # -- the primitives (operations.Painter) -------------------------------------------------------

    def _call(self, pipe: Any, sampling: Sampling, on_step: StepCallback | None, **kwargs: Any) -> list[Image.Image]:
        """One pipeline call producing ``len(sampling.seeds)`` images; output ``k``'s noise comes
        from a CPU generator seeded with ``sampling.seeds[k]``."""
        if sampling.steps < 2 and pipe.scheduler.config.get("shift_terminal"):
            # The pipeline's sigmas for 1 step are [1.0]; stretching them to shift_terminal
            # (0.02 in the real Qwen-Image config) divides 0 by 0, and the image comes out NaN
            # (black) with only a RuntimeWarning. Refuse instead of returning garbage.
            raise ValueError("this model's scheduler needs at least 2 steps (shift_terminal is set)")
        negative_prompt = sampling.negative_prompt
        if negative_prompt is None and sampling.true_cfg_scale > 1.0:
            negative_prompt = _EMPTY_NEGATIVE_PROMPT

        def on_step_end(
            pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            total = pipe.num_timesteps
            previews = self._previews
            if previews is not None and previews.every_n_steps > 0 and step_index + 1 < total \
                    and (step_index + 1) % previews.every_n_steps == 0:
                preview = latent_preview(callback_kwargs.get("latents"), kwargs.get("width"), kwargs.get("height"))
                if preview is not None:
                    previews.sink(step_index + 1, preview)
            if on_step is not None and not on_step(step_index + 1, total):
                pipe._interrupt = True
                # Raise here instead of letting the loop run out: after an interrupted loop the
                # pipeline still VAE-decodes the half-denoised latents (seconds of wasted work on
                # a canceled job). Unwinding is clean: the pipeline resets its state per call.
                raise RenderInterrupted(step_index + 1, total)
            return callback_kwargs

        output = pipe(
            prompt=sampling.prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=sampling.steps,
            true_cfg_scale=sampling.true_cfg_scale,
            num_images_per_prompt=len(sampling.seeds),
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in sampling.seeds],
            output_type="pil",
            callback_on_step_end=on_step_end,
            **kwargs,
        )
        if getattr(pipe, "_interrupt", False):
            # Only reachable if a future diffusers swallows callback exceptions.
            raise RenderInterrupted(sampling.steps, sampling.steps)
        return [image.convert("RGB") for image in output.images]

    def edit(self, images: list[Image.Image], sampling: Sampling, size: tuple[int, int],
             on_step: StepCallback | None) -> list[Image.Image]:
        """Instruction edit rendered at ``size``: ``QwenImageEditPipeline`` for one image, the
        multi-image ``QwenImageEditPlusPipeline`` when references follow ``images[0]``."""
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        if len(rgb) == 1:
            return self._call(self.pipeline("edit"), sampling, on_step, image=rgb[0], width=size[0], height=size[1])
        return self._call(self.pipeline("edit_plus"), sampling, on_step, image=rgb, width=size[0], height=size[1])

    def generate(self, sampling: Sampling, size: tuple[int, int],
                 on_step: StepCallback | None) -> list[Image.Image]:
        """Text to image (``QwenImagePipeline``) at ``size``."""
        return self._call(self.pipeline("generate"), sampling, on_step, width=size[0], height=size[1])

    def inpaint(self, image: Image.Image, mask: Image.Image, sampling: Sampling, strength: float,
                on_step: StepCallback | None) -> list[Image.Image]:
        """``QwenImageInpaintPipeline`` at ``image.size`` (multiples of 16); white = repaint."""
        return self._call(self.pipeline("inpaint"), sampling, on_step, image=image.convert("RGB"),
                          mask_image=mask.convert("L"), width=image.width, height=image.height, strength=strength)

    def img2img(self, image: Image.Image, sampling: Sampling, strength: float,
                on_step: StepCallback | None) -> list[Image.Image]:
        """``QwenImageImg2ImgPipeline`` at ``image.size`` (multiples of 16)."""
        return self._call(self.pipeline("img2img"), sampling, on_step, image=image.convert("RGB"),
                          width=image.width, height=image.height, strength=strength)

    @contextlib.contextmanager
    def tiled_vae(self) -> Iterator[None]:
        """Within the block the shared VAE encodes/decodes large images in tiles (if its class
        supports ``enable_tiling``); its previous setting is restored on exit."""
        vae = self.pipe.vae
        if not hasattr(vae, "enable_tiling"):
            yield
            return
        previous = getattr(vae, "use_tiling", False)
        vae.enable_tiling()
        try:
            yield
        finally:
            vae.use_tiling = previous

    # -- Renderer --------------------------------------------------------------------------------

    def render(self, request: RenderRequest, on_step: StepCallback | None = None, *,
               previews: Previews | None = None) -> list[Image.Image]:
        """Run ``request`` (any of ``OPERATIONS``, see ``workers.operations`` for sizes, alpha and
        progress) with its LoRAs applied for this request only; ``previews`` from the latents
        (no VAE decode) while it renders.

        Noise comes from CPU generators (output ``k``: ``seed + k``), so on CPU the same request
        gives byte-identical images; on GPU the same seed gives the same starting noise on every
        card, but kernels may differ in the last bits.

        Raises:
            RenderInterrupted: ``on_step`` returned False (the VAE decode is skipped).
            InvalidRequest: e.g. an empty mask, or a LoRA file that does not fit the model.
            ValueError: a 1-step request to a scheduler with ``shift_terminal`` (see ``_call``).
        """
        if request.steps < 2 and self.pipe.scheduler.config.get("shift_terminal"):
            raise ValueError("this model's scheduler needs at least 2 steps (shift_terminal is set)")
        # the operations call the primitives (edit, inpaint, ...) without knowing of previews: the
        # pipeline calls of this render find them here (one render at a time per renderer)
        self._previews = previews
        try:
            with self.loras.applied(request.loras):
                return operations.run(self, request, on_step)
        finally:
            self._previews = None

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
        # an offloaded transformer lives in host memory by design: check the VAE, which never moves
        resident = self.pipe.vae if self.profile.offload else self.pipe.transformer
        weights_on = next(resident.parameters()).device
        if weights_on.type != torch.device(self.device).type:
            raise RuntimeError(f"{type(resident).__name__} weights are on {weights_on}, expected {self.device}")

    def warmup(self) -> None:
        """Make every pipeline (``from_pipe``: milliseconds, no weights copied), then a 2-step
        edit (1 step is refused, see ``render``) of a 64x64 grey image without CFG; the result
        is discarded. Still encodes/decodes at ~1 MP like any default-size edit.

        Then an edit at each of the preset's ``warmup_sizes`` (a compiled model compiles the
        shapes it will serve now, not inside a job), after which any compile counts as a
        recompile (see ``CompileWatch``)."""
        for kind in _PIPELINE_CLASSES:
            self.pipeline(kind)
        sizes = [(64, 64, None), *((w, h, (w, h)) for w, h in self.preset.warmup_sizes)]
        for width, height, size in sizes:
            self.render(
                RenderRequest(
                    operation="edit",
                    prompt="warm up",
                    negative_prompt=None,
                    steps=2,
                    true_cfg_scale=1.0,
                    seed=0,
                    images=[Image.new("RGB", (width, height), (128, 128, 128))],
                    width=size[0] if size else None,
                    height=size[1] if size else None,
                )
            )
        if self.compile_watch is not None:
            self.compile_watch.arm()


_PIPELINE_CLASSES: dict[str, str] = {
    "edit": "QwenImageEditPipeline",
    "edit_plus": "QwenImageEditPlusPipeline",
    "generate": "QwenImagePipeline",
    "inpaint": "QwenImageInpaintPipeline",
    "img2img": "QwenImageImg2ImgPipeline",
}
