"""``Renderer`` backed by the diffusers Qwen-Image pipelines: one model of the family loaded as
its own class (text to image, edit, multi-image edit, edit inpaint, Qwen-Image 2.1), and each
operation run by the pipeline that those weights can serve, all sharing the loaded weights.

Import-safe in a Celery prefork parent: this module imports torch (and numpy/PIL) only. ``import diffusers``
calls ``torch.cuda.is_available()`` at import time (``diffusers.utils.torch_utils``), which
initialises the CUDA driver and can break CUDA in forked children, so diffusers is imported
inside ``DiffusersRenderer.load`` — i.e. in the worker child, after the fork.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
from PIL import Image

from broker.catalog import PIPELINE_OPERATIONS
from workers import operations
from workers.operations import Sampling

from .base import (
    OPERATIONS,
    MoveSpec,
    OutpaintSpec,
    Previews,
    Renderer,
    RenderInterrupted,
    RenderRequest,
    StepCallback,
    UnsupportedOperation,
    UpscaleSpec,
)
from .compile_watch import CompileWatch
from .lora import LoraCache
from .presets import FastPreset
from .profiles import MemoryProfile

__all__ = ["DEFAULT_PIPELINE", "OPERATION_KINDS", "PIPELINE_KINDS", "DiffusersRenderer", "latent_preview",
           "resolve_dtype"]

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

DEFAULT_PIPELINE = "QwenImageEditPipeline"  # what EDITFARM_MODEL alone is loaded as
_EDIT_INPAINT = "QwenImageEditInpaintPipeline"
_QWEN21 = "QwenImage21Pipeline"

# The pipeline each primitive ("kind") runs on, per class a model is loaded as. A kind whose class
# is the loaded one runs on the loaded pipeline itself; the others are built from its components
# (the text-to-image, inpaint and img2img classes need a subset of the edit classes' components,
# which is how a one-model cluster ran every operation on edit weights). What each class serves
# is broker/catalog.py's PIPELINE_OPERATIONS; OPERATION_KINDS says which kinds an operation needs.
_QWEN_IMAGE_KINDS = {"generate": "QwenImagePipeline", "inpaint": "QwenImageInpaintPipeline",
                     "img2img": "QwenImageImg2ImgPipeline"}
_EDIT_KINDS = {"edit": "QwenImageEditPipeline", "edit_plus": "QwenImageEditPlusPipeline", **_QWEN_IMAGE_KINDS}
PIPELINE_KINDS: Mapping[str, Mapping[str, str]] = types.MappingProxyType({
    "QwenImagePipeline": types.MappingProxyType(_QWEN_IMAGE_KINDS),
    "QwenImageEditPipeline": types.MappingProxyType(_EDIT_KINDS),
    "QwenImageEditPlusPipeline": types.MappingProxyType(_EDIT_KINDS),
    # instruction-guided inpainting on edit weights: the masked operations, through its own class
    _EDIT_INPAINT: types.MappingProxyType({"inpaint": _EDIT_INPAINT}),
    # one class for text to image and image-conditioned edits (one or several condition images)
    _QWEN21: types.MappingProxyType({"generate": _QWEN21, "edit": _QWEN21, "edit_plus": _QWEN21}),
})
OPERATION_KINDS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "edit": ("edit", "edit_plus"), "generate": ("generate",), "inpaint": ("inpaint",),
    "outpaint": ("inpaint",), "move": ("inpaint",), "upscale": ("img2img",),
})
# The operation a model's warm-up renders first: the one its class exists for.
_WARMUP_OPERATION = {"QwenImagePipeline": "generate", "QwenImageEditPipeline": "edit",
                     "QwenImageEditPlusPipeline": "edit", _EDIT_INPAINT: "inpaint", _QWEN21: "generate"}
# Qwen-Image 2.1 renders sides that are multiples of 32 (16x VAE, then 2x2 groups of latents);
# its condition images are resized to about this side squared, like the edit classes' 1 MP.
_QWEN21_MULTIPLE = 32
_QWEN21_CONDITION_SIDE = 1024
_EDIT_INPAINT_AREA = 1024 * 1024  # the edit inpaint class renders at ~1 MP whatever it is asked


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


def served_operations(pipeline: str, operations: Collection[str] | None = None) -> tuple[str, ...]:
    """What a model loaded as ``pipeline`` serves, in ``OPERATIONS`` order: every operation the
    class can serve, or the subset ``operations`` (a catalog entry's list).

    Raises:
        ValueError: ``pipeline`` is not a known Qwen-Image class, or ``operations`` is empty or
            names one the class cannot serve.
    """
    if pipeline not in PIPELINE_KINDS:
        raise ValueError(f"unknown pipeline {pipeline!r}; the Qwen-Image pipelines are {', '.join(PIPELINE_KINDS)}")
    can = {str(op.value) for op in PIPELINE_OPERATIONS[pipeline]}
    if operations is None:
        return tuple(op for op in OPERATIONS if op in can)
    wanted = {str(getattr(op, "value", op)) for op in operations}
    cannot = sorted(wanted - can)
    if not wanted or cannot:
        raise ValueError(f"{pipeline} serves {', '.join(op for op in OPERATIONS if op in can)}; "
                         f"asked for {', '.join(sorted(wanted)) or 'nothing'}")
    return tuple(op for op in OPERATIONS if op in wanted)


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: diffusers renamed ``torch_dtype`` to ``dtype`` (the
    old name now warns) and older releases ignore ``dtype``; detect which this one takes."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


FINGERPRINT_TENSORS = 2
FINGERPRINT_ELEMENTS = 1 << 20


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of ``module``'s weights as loaded (milliseconds, also for 20B weights): the names,
    dtypes, shapes and first ``FINGERPRINT_ELEMENTS`` values of its first and last
    ``FINGERPRINT_TENSORS`` tensors (the input and output projections of a transformer, which every
    fine-tune and distillation changes). Two processes that loaded the same weights the same way
    (dtype, profile) agree; a different model does not."""
    import hashlib

    state = list(module.state_dict().items())
    picked = state[:FINGERPRINT_TENSORS] + state[-FINGERPRINT_TENSORS:] if len(state) > 2 * FINGERPRINT_TENSORS \
        else state
    digest = hashlib.sha256()
    for name, tensor in picked:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        try:
            head = tensor.detach().reshape(-1)[:FINGERPRINT_ELEMENTS].contiguous().cpu()
            digest.update(head.view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError, NotImplementedError):
            digest.update(b"?")  # a quantized tensor subclass (torchao) without plain storage: its layout only
    return digest.hexdigest()[:16]


def latent_preview(latents: Any, width: int | None, height: int | None, max_side_px: int = 128, *,
                   packing: int = 2, latent_channels: int | None = None) -> Image.Image | None:
    """A rough RGB preview of a pipeline's sequence latents, without the VAE (milliseconds).

    The latents are ``[batch, (h/16)*(w/16), latent_channels * packing**2]``: one token per
    16x16 px. Qwen-Image packs 2x2 cells of its 8x VAE's grid into a token (``packing=2``),
    Qwen-Image 2.1 takes its 16x VAE's cells unpacked (``packing=1``). Each token's packed group
    is averaged and the first three latent channels are stretched to 0..255. Returns None when
    the shape does not match ``width``x``height`` (or ``latent_channels``, when given): no
    preview rather than a wrong one.
    """
    if latents is None or not width or not height or latents.ndim != 3 or packing < 1:
        return None
    group = packing * packing
    grid_h, grid_w = int(height) // 16, int(width) // 16
    channels = latents.shape[2]
    if latents.shape[1] != grid_h * grid_w or channels % group or channels // group < 3:
        return None
    if latent_channels is not None and channels != latent_channels * group:
        return None
    x = latents[0].detach().float().reshape(grid_h, grid_w, channels // group, group).mean(-1)[..., :3]
    low = x.amin(dim=(0, 1), keepdim=True)
    high = x.amax(dim=(0, 1), keepdim=True)
    rgb = ((x - low) / (high - low + 1e-6) * 255).clamp(0, 255).to(torch.uint8).cpu().numpy()
    image = Image.fromarray(rgb, "RGB")
    scale = max_side_px / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def _round_up(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    return (-(-size[0] // multiple) * multiple, -(-size[1] // multiple) * multiple)


def _resized(images: list[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    return [image if image.size == size else image.resize(size, Image.Resampling.LANCZOS) for image in images]


class DiffusersRenderer(Renderer):
    """One Qwen-Image model loaded once and kept on ``device``; every operation it serves runs on it.

    The loaded pipeline (its class: the catalog entry's ``pipeline``, ``QwenImageEditPipeline``
    by default) is the base; the other pipelines its weights can run (``PIPELINE_KINDS``: the
    text-to-image, inpaint, img2img and multi-image edit ones for the edit classes) are built
    from its components on first use and share its transformer, VAE, text encoder and tokenizer
    objects: one copy of the weights per process. Each gets its own scheduler (no weights, but
    mutable state). An operation the model does not serve is refused (``UnsupportedOperation``).
    Use ``load`` to build.

    Attributes:
        device: torch device string, e.g. "cpu", "cuda", "cuda:1".
        dtype: weight dtype.
        model: the path or hub id the weights came from.
        pipe: the loaded diffusers pipeline (typed ``Any``: importing diffusers for the
            annotation would defeat the lazy import, and mypy sees its lazily-exported classes
            as opaque anyway).
        pipeline_name: its class name.
        operations: the operations served, in ``OPERATIONS`` order.
        loras: the LoRA adapters loaded into the shared transformer.
    """

    def __init__(self, pipe: Any, model: str, device: str, dtype: torch.dtype, lora_capacity: int = 8, *,
                 operations: Collection[str] | None = None) -> None:
        """Raises:
            ValueError: ``pipe``'s class is not a Qwen-Image pipeline, or ``operations`` names one
                it cannot serve (see ``served_operations``).
        """
        self.pipe = pipe
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pipeline_name = type(pipe).__name__
        self.operations = served_operations(self.pipeline_name, operations)
        self._kinds = PIPELINE_KINDS[self.pipeline_name]
        self.loras = LoraCache(pipe, capacity=lora_capacity)
        self._fingerprint: str | None = None
        self._pipes: dict[str, Any] = {}
        # the previews of the render under way (render's argument), read by each pipeline call's
        # step callback; None between renders
        self._previews: Previews | None = None
        self.profile = MemoryProfile()
        self.preset = FastPreset()
        self.compile_watch: CompileWatch | None = None

    @classmethod
    def load(cls, model: str, device: str = "cpu", dtype: str | None = None,
             lora_capacity: int = 8, *, pipeline: str = DEFAULT_PIPELINE, operations: Collection[str] | None = None,
             profile: MemoryProfile | None = None, preset: FastPreset | None = None,
             on_recompile: Callable[[float], None] | None = None,
             allow_offload_on_cpu: bool = False) -> DiffusersRenderer:
        """Load ``model`` (a local folder or hub id) as the diffusers class ``pipeline`` and place
        it on ``device`` as ``profile`` says (default: every weight in ``dtype`` on ``device``),
        sped up as ``preset`` says (default: nothing).

        ``pipeline``: one of ``PIPELINE_KINDS`` (the catalog's ``pipeline``); ``operations``: the
        subset of what that class serves that this model may run (default: all of it).
        ``dtype`` is a name as accepted by ``resolve_dtype``; default bf16 on CUDA, float32
        elsewhere. Takes seconds (tiny model) to minutes (real 20B weights, ~58 GB in bf16).
        ``lora_capacity``: LoRA adapters kept loaded between jobs (see ``LoraCache``).
        ``on_recompile(seconds)``: called for every torch.compile after the warm-up.
        ``allow_offload_on_cpu``: tests and benchmarks only (see ``memory.apply_profile``).

        Raises:
            ValueError: unknown ``dtype`` or ``pipeline`` (or one this diffusers lacks), or
                ``operations`` the class cannot serve.
            ProfileError: ``device`` cannot do ``profile``, or torchao is missing.
            PresetError: a fused LoRA or scheduler override does not fit the model.
            RuntimeError: ``device`` is malformed or unavailable (from torch).
            OSError: ``model`` is missing or incomplete (from diffusers/huggingface_hub).
        """
        from .fast import fuse_and_schedule, speed_up
        from .memory import apply_profile

        served = served_operations(pipeline, operations)  # before the slow load
        profile = profile or MemoryProfile()
        preset = preset or FastPreset()
        torch_dtype = resolve_dtype(device, dtype)
        # Fail on a malformed or absent device, or a profile it cannot do, before the slow load.
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if not allow_offload_on_cpu:
            profile.check_device(torch.device(device).type)

        import diffusers

        pipeline_class = getattr(diffusers, pipeline, None)
        if pipeline_class is None:
            raise ValueError(f"the installed diffusers ({diffusers.__version__}) has no {pipeline}; upgrade it")
        pipe: Any = pipeline_class.from_pretrained(model, **{_dtype_kwarg(): torch_dtype})
        fuse_and_schedule(pipe, preset)  # into the full-precision weights, before any cast
        apply_profile(pipe, profile, device, torch_dtype, allow_offload_on_cpu=allow_offload_on_cpu)
        # tqdm bars would interleave in worker logs; progress is reported through on_step.
        pipe.set_progress_bar_config(disable=True)
        renderer = cls(pipe, model=model, device=device, dtype=torch_dtype, lora_capacity=lora_capacity,
                       operations=served)
        renderer.profile, renderer.preset = profile, preset
        renderer.compile_watch = speed_up(pipe, preset, on_recompile)
        return renderer

    def identity(self) -> dict[str, str]:
        """The loaded class and :func:`weights_fingerprint` of its transformer (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.pipe.transformer)
        return {"pipeline": self.pipeline_name, "weights": self._fingerprint}

    # -- the pipelines ---------------------------------------------------------------------------

    def pipeline(self, kind: str) -> Any:
        """The pipeline for ``kind`` (one of this class's ``PIPELINE_KINDS``: "edit", "edit_plus",
        "generate", "inpaint", "img2img"): the loaded pipeline when it is of that kind's class,
        else made from its components on first use and cached. Shares every model object.

        Raises:
            ValueError: ``kind`` is unknown, or not one this model's weights can run.
        """
        if kind in self._pipes:
            return self._pipes[kind]
        class_name = self._kinds.get(kind)
        if class_name is None:
            raise ValueError(f"no pipeline kind {kind!r} for {self.pipeline_name}; it has {sorted(self._kinds)}")
        if class_name == self.pipeline_name:
            self._pipes[kind] = self.pipe
            return self.pipe
        import diffusers

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

    def _preview_layout(self) -> dict[str, int]:
        """How this model's sequence latents map to pixels (``latent_preview``'s keywords)."""
        z_dim = getattr(getattr(self.pipe.vae, "config", None), "z_dim", None)
        layout = {"packing": 1 if self.pipeline_name == _QWEN21 else 2}
        if isinstance(z_dim, int):
            layout["latent_channels"] = z_dim
        return layout

    # -- the primitives (operations.Painter) -------------------------------------------------------

    def _call(self, pipe: Any, sampling: Sampling, on_step: StepCallback | None, *,
              preview_size: tuple[int, int] | None = None, **kwargs: Any) -> list[Image.Image]:
        """One pipeline call producing ``len(sampling.seeds)`` images; output ``k``'s noise comes
        from a CPU generator seeded with ``sampling.seeds[k]``. ``preview_size``: the size the
        pipeline renders at when it is not the ``width``/``height`` it is given."""
        if sampling.steps < 2 and pipe.scheduler.config.get("shift_terminal"):
            # The pipeline's sigmas for 1 step are [1.0]; stretching them to shift_terminal
            # (0.02 in the real Qwen-Image config) divides 0 by 0, and the image comes out NaN
            # (black) with only a RuntimeWarning. Refuse instead of returning garbage.
            raise ValueError("this model's scheduler needs at least 2 steps (shift_terminal is set)")
        negative_prompt = sampling.negative_prompt
        if negative_prompt is None and sampling.true_cfg_scale > 1.0:
            negative_prompt = _EMPTY_NEGATIVE_PROMPT
        preview_width, preview_height = preview_size or (kwargs.get("width"), kwargs.get("height"))
        layout = self._preview_layout()

        def on_step_end(
            pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            total = pipe.num_timesteps
            previews = self._previews
            if previews is not None and previews.every_n_steps > 0 and step_index + 1 < total \
                    and (step_index + 1) % previews.every_n_steps == 0:
                preview = latent_preview(callback_kwargs.get("latents"), preview_width, preview_height, **layout)
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
        multi-image ``QwenImageEditPlusPipeline`` when references follow ``images[0]``; a
        Qwen-Image 2.1 model takes them all as condition images."""
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        if self.pipeline_name == _QWEN21:
            return self._qwen21(sampling, size, on_step, image=rgb, output_resolution=_QWEN21_CONDITION_SIDE)
        if len(rgb) == 1:
            return self._call(self.pipeline("edit"), sampling, on_step, image=rgb[0], width=size[0], height=size[1])
        return self._call(self.pipeline("edit_plus"), sampling, on_step, image=rgb, width=size[0], height=size[1])

    def generate(self, sampling: Sampling, size: tuple[int, int],
                 on_step: StepCallback | None) -> list[Image.Image]:
        """Text to image at ``size`` (``QwenImagePipeline``, or the 2.1 pipeline without an image)."""
        if self.pipeline_name == _QWEN21:
            return self._qwen21(sampling, size, on_step)
        return self._call(self.pipeline("generate"), sampling, on_step, width=size[0], height=size[1])

    def _qwen21(self, sampling: Sampling, size: tuple[int, int], on_step: StepCallback | None,
                **kwargs: Any) -> list[Image.Image]:
        """A 2.1 call at ``size``: rendered at the sides rounded up to its multiple of 32 (it
        would floor them, giving a smaller image than asked), then resized to ``size``."""
        render = _round_up(size, _QWEN21_MULTIPLE)
        images = self._call(self.pipeline("generate"), sampling, on_step, width=render[0], height=render[1], **kwargs)
        return _resized(images, size)

    def inpaint(self, image: Image.Image, mask: Image.Image, sampling: Sampling, strength: float,
                on_step: StepCallback | None) -> list[Image.Image]:
        """``QwenImageInpaintPipeline`` at ``image.size`` (multiples of 16); white = repaint. An
        edit inpaint model repaints with the prompt as an instruction, at ~1 MP with the image's
        aspect (its class's own size), resized back to ``image.size``."""
        rgb, gray = image.convert("RGB"), mask.convert("L")
        pipe = self.pipeline("inpaint")
        if self.pipeline_name != _EDIT_INPAINT:
            return self._call(pipe, sampling, on_step, image=rgb, mask_image=gray, width=image.width,
                              height=image.height, strength=strength)
        images = self._call(pipe, sampling, on_step, preview_size=_edit_inpaint_size(pipe, image.size), image=rgb,
                            mask_image=gray, width=image.width, height=image.height, strength=strength)
        return _resized(images, image.size)

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
            UnsupportedOperation: the model does not serve ``request.operation``.
            InvalidRequest: e.g. an empty mask, or a LoRA file that does not fit the model.
            ValueError: a 1-step request to a scheduler with ``shift_terminal`` (see ``_call``).
        """
        if request.operation not in self.operations:
            raise UnsupportedOperation(f"this model does not serve {request.operation} jobs; it serves "
                                       f"{', '.join(self.operations)}")
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
        """Make every pipeline this model runs (no weights copied), then a 2-step render (1 step
        is refused, see ``render``) without CFG of what the model exists for: an edit of a 64x64
        grey image for the edit classes (encoded and decoded at ~1 MP like any default-size
        edit), a 64x64 image for text-to-image and 2.1, a repaint of a 64x64 image for edit
        inpaint (or, with those not served, the first operation it serves); the result is discarded.

        Then the same at each of the preset's ``warmup_sizes`` (a compiled model compiles the
        shapes it will serve now, not inside a job), after which any compile counts as a
        recompile (see ``CompileWatch``)."""
        for kind in dict.fromkeys(kind for op in self.operations for kind in OPERATION_KINDS[op]):
            self.pipeline(kind)
        operation = self.warmup_operation
        sizes = [(64, 64, False), *((w, h, True) for w, h in self.preset.warmup_sizes)]
        for width, height, explicit in sizes:
            self.render(_warmup_request(operation, width, height, explicit))
        if self.compile_watch is not None:
            self.compile_watch.arm()

    @property
    def warmup_operation(self) -> str:
        """The operation ``warmup`` renders (see there)."""
        first = _WARMUP_OPERATION[self.pipeline_name]
        return first if first in self.operations else self.operations[0]


def _edit_inpaint_size(pipe: Any, size: tuple[int, int]) -> tuple[int, int] | None:
    """The size the edit inpaint class renders an image of ``size`` at, whatever it is asked: its
    module's ~1 MP with the image's aspect, floored to its multiple (None if it has no such rule)."""
    calculate = getattr(inspect.getmodule(type(pipe)), "calculate_dimensions", None)
    if calculate is None:
        return None
    width, height, _ = calculate(_EDIT_INPAINT_AREA, size[0] / size[1])
    multiple = int(pipe.vae_scale_factor) * 2
    return (int(width) // multiple * multiple, int(height) // multiple * multiple)


def _warmup_request(operation: str, width: int, height: int, explicit: bool) -> RenderRequest:
    """A 2-step, no-CFG ``operation`` of a ``width`` x ``height`` grey image (or output), whose
    result is thrown away. ``explicit``: an edit is asked for that size, not its default ~1 MP."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    fields: dict[str, Any] = {"operation": operation, "prompt": "warm up", "negative_prompt": None, "steps": 2,
                              "true_cfg_scale": 1.0, "seed": 0, "images": [image]}
    if operation == "generate":
        fields.update(images=[], width=width, height=height)
    elif operation == "edit" and explicit:
        fields.update(width=width, height=height)
    elif operation == "inpaint":
        fields.update(boxes=[(0.25, 0.25, 0.75, 0.75)])
    elif operation == "outpaint":
        fields.update(outpaint=OutpaintSpec(right=16))
    elif operation == "move":
        fields.update(move=MoveSpec(box=(0.25, 0.25, 0.5, 0.5), dx=8))
    elif operation == "upscale":
        half = Image.new("RGB", (max(16, width // 2), max(16, height // 2)), (128, 128, 128))
        fields.update(images=[half], width=width, height=height, upscale=UpscaleSpec(tile=min(1024, max(32, width, height))))
    return RenderRequest(**fields)
