"""Plain-Python types shared by the worker and the pipeline adapters.

Deliberately free of torch/diffusers imports: the Celery parent process, the API and the
tests import these types without paying for (or initialising) a deep-learning stack.

Units: sizes and offsets in pixels (``px``) are integers; boxes are *relative* coordinates
``(x0, y0, x1, y1)`` in ``[0, 1]`` of the main input image, ``x0 < x1`` and ``y0 < y1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

__all__ = [
    "DIRECTIONS",
    "MAX_BOXES",
    "MAX_CANVAS_SIDE",
    "MAX_LORAS",
    "MAX_NATIVE_SIDE",
    "MAX_NUM_IMAGES",
    "MAX_REFERENCE_IMAGES",
    "MAX_SEED",
    "MAX_UPSCALE_SIDE",
    "MIN_SIDE",
    "MIN_STRENGTH",
    "OPERATIONS",
    "SIZE_MULTIPLE",
    "PreviewSink",
    "Previews",
    "InvalidRequest",
    "MoveSpec",
    "OutpaintSpec",
    "RenderInterrupted",
    "RenderRequest",
    "Renderer",
    "StepCallback",
    "UnsupportedOperation",
    "UpscaleSpec",
]

# Operations a renderer may be asked for.
OPERATIONS: tuple[str, ...] = ("edit", "generate", "inpaint", "outpaint", "move", "upscale")
# torch.Generator.manual_seed takes an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1
# Outputs per request. Image k's noise is seeded with (seed + k) mod 2**64.
MAX_NUM_IMAGES = 4
# An edit takes one main image plus up to this many reference images.
MAX_REFERENCE_IMAGES = 3
# Explicit sizes (edit/generate output, upscale target) are multiples of this: the VAE
# downsamples by 8 and the transformer packs 2x2 latents.
SIZE_MULTIPLE = 16
MIN_SIDE = 16
# Largest side the model renders in one pass (edit and generate width/height).
MAX_NATIVE_SIDE = 1024
# Largest upscale target side (rendered tile by tile).
MAX_UPSCALE_SIDE = 2048
# Largest side of an outpainted canvas (rendered around the new area, see operations).
MAX_CANVAS_SIDE = 4096
MAX_LORAS = 4
MAX_BOXES = 16
# A smaller strength leaves no denoising step at all (diffusers: steps * strength rounds to 0).
MIN_STRENGTH = 0.01
# Outpaint directions: where the new area goes when a target size is given.
DIRECTIONS: tuple[str, ...] = (
    "center", "left", "right", "top", "bottom", "top-left", "top-right", "bottom-left", "bottom-right",
)

# (steps_done, total_steps) -> keep_going. steps_done counts from 1, so the last call of an
# uninterrupted N-step render is (N, N). Returning False cancels the render.
StepCallback = Callable[[int, int], bool]

Box = tuple[float, float, float, float]

# (step, small RGB image) -> None: stores and announces a preview; must not raise.
PreviewSink = Callable[[int, Image.Image], None]


@dataclass(frozen=True)
class Previews:
    """What a render is asked to preview: ``sink(step, image)`` every ``every_n_steps`` denoising
    steps (never on the last step: the result follows at once). A renderer that cannot make
    previews (the stand-in, test fakes) ignores it."""

    every_n_steps: int
    sink: PreviewSink


def check_box(box: object) -> Box:
    """``box`` as a tuple of 4 floats, relative ``(x0, y0, x1, y1)``.

    Raises:
        ValueError: not 4 finite numbers with ``0 <= x0 < x1 <= 1`` and ``0 <= y0 < y1 <= 1``.
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ValueError(f"a box is 4 numbers [x0, y0, x1, y1], got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box coordinates must be finite, got {box!r}")
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"a box needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (relative), got {box!r}")
    return (x0, y0, x1, y1)


def _check_side(name: str, value: int | None, maximum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004 - one error type for callers
    if not MIN_SIDE <= value <= maximum or value % SIZE_MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE} in [{MIN_SIDE}, {maximum}], got {value}")


@dataclass(frozen=True)
class OutpaintSpec:
    """How to extend the canvas: either margins, or a target size plus a direction.

    Attributes:
        left, top, right, bottom: px of new canvas on each side (>= 0). Used when neither
            ``width`` nor ``height`` is given; at least one must be > 0 then.
        width, height: target canvas size in px (each >= the input's side; a missing one
            keeps the input's). Exclusive with the margins.
        direction: where the new area goes with a target size: one of ``DIRECTIONS``.
            "right" puts all new columns on the right (the image stays at the left edge);
            "center" splits the new area evenly (an odd pixel goes right/bottom); "top-left"
            etc. combine one vertical and one horizontal side; an axis a direction does not
            name is split evenly ("right" with a taller target grows top and bottom equally).
    """

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0
    width: int | None = None
    height: int | None = None
    direction: str = "center"

    def __post_init__(self) -> None:
        margins = (self.left, self.top, self.right, self.bottom)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in margins):
            raise ValueError(f"outpaint margins must be integers >= 0 px, got {margins}")
        if any(m > MAX_CANVAS_SIDE for m in margins):
            raise ValueError(f"an outpaint margin is at most {MAX_CANVAS_SIDE} px, got {margins}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_CANVAS_SIDE):
                raise ValueError(f"outpaint {name} must be an integer in [1, {MAX_CANVAS_SIDE}], got {value!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"outpaint direction must be one of {DIRECTIONS}, got {self.direction!r}")
        has_target = self.width is not None or self.height is not None
        if has_target and any(margins):
            raise ValueError("give outpaint margins or a target width/height with a direction, not both")
        if not has_target and not any(margins):
            raise ValueError("outpaint needs a margin > 0 or a target width/height")


@dataclass(frozen=True)
class MoveSpec:
    """Cut the region ``box`` (relative), scale it by ``scale`` about its centre, shift it by
    (``dx``, ``dy``) px of the input image, paste it; repaint the vacated area and a seam band.

    Attributes:
        box: relative ``(x0, y0, x1, y1)`` of the object in the main input.
        dx, dy: offset of the object's centre in px (positive: right, down).
        scale: size factor (0.85 = shrink by 15%), in ``[0.05, 4]``.
        seam: width in px of the band around the pasted object's edge that is repainted to
            blend it in (half inside, half outside the object; 0 = none), in ``[0, 256]``.
    """

    box: Box
    dx: int = 0
    dy: int = 0
    scale: float = 1.0
    seam: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", check_box(self.box))
        for name in ("dx", "dy", "seam"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"move {name} must be an integer (px), got {value!r}")  # noqa: TRY004
        if abs(self.dx) > MAX_CANVAS_SIDE or abs(self.dy) > MAX_CANVAS_SIDE:
            raise ValueError(f"move dx/dy are at most {MAX_CANVAS_SIDE} px, got {(self.dx, self.dy)}")
        if not 0 <= self.seam <= 256:
            raise ValueError(f"move seam must be in [0, 256] px, got {self.seam}")
        if not (isinstance(self.scale, (int, float)) and 0.05 <= self.scale <= 4.0):
            raise ValueError(f"move scale must be in [0.05, 4], got {self.scale!r}")


@dataclass(frozen=True)
class UpscaleSpec:
    """Tiling of an upscale. The target size is ``RenderRequest.width``/``height``; when neither
    is given it is the input times ``scale`` (rounded to multiples of 16, shrunk to fit
    ``MAX_UPSCALE_SIDE`` keeping the aspect ratio).

    Attributes:
        scale: enlargement factor used without an explicit target, in ``(0, 8]``.
        tile: tile side in px (multiple of 16, in [32, MAX_NATIVE_SIDE]); a target side
            smaller than the tile gives a tile of that side.
        overlap: minimum overlap between neighbouring tiles in px, in ``[0, tile / 2)``; the
            seams are cross-faded over the actual overlap with linear weights.
    """

    scale: float = 2.0
    tile: int = 1024
    overlap: int = 128

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and 0 < self.scale <= 8):
            raise ValueError(f"upscale scale must be in (0, 8], got {self.scale!r}")
        _check_side("upscale tile", self.tile, MAX_NATIVE_SIDE)
        if self.tile < 32:
            raise ValueError(f"upscale tile must be >= 32 px, got {self.tile}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= 2 * self.overlap < self.tile:
            raise ValueError(f"upscale overlap must be an integer in [0, tile / 2), got {self.overlap!r}")


@dataclass(frozen=True)
class RenderRequest:
    """One render job, in pipeline terms. See ``workers.operations`` for what each operation
    does and the size of what comes out.

    Attributes:
        operation: one of ``OPERATIONS``.
        prompt: the instruction (edit) or description (the others; may be empty for
            outpaint/move/upscale/inpaint, not for edit/generate).
        negative_prompt: text to steer away from; ``None`` means none given (a single space
            is used when CFG is on, as the Qwen-Image reference does).
        steps: denoising steps (>= 1; the renderer refuses 1 with the Qwen scheduler).
        true_cfg_scale: classifier-free guidance scale (>= 0); CFG is active only above 1.0,
            and then costs a second transformer pass per step.
        seed: RNG seed in ``[0, MAX_SEED]``; the same request gives the same bytes on one
            device. Output ``k`` uses noise seeded with ``(seed + k) mod 2**64``.
        images: input images, any PIL mode; an alpha channel in ``images[0]`` is carried to
            the output (see ``workers.operations``). edit: ``images[0]`` is the image to
            edit and ``images[1:]`` up to ``MAX_REFERENCE_IMAGES`` references (then the
            multi-image edit pipeline runs); generate: none; the others: exactly one.
        num_images: outputs to produce, ``1..MAX_NUM_IMAGES``.
        width, height: px, multiples of 16. edit: output size (default: ~1 MP with the main
            image's aspect; one given, the other follows the aspect); generate: output size
            (default 1024 each), both at most ``MAX_NATIVE_SIDE``; upscale: the target (at most
            ``MAX_UPSCALE_SIDE``). Refused for inpaint/outpaint/move (their output is the input
            size, or the new canvas).
        strength: how much of the repainted area is re-noised, in ``[MIN_STRENGTH, 1]``;
            inpaint/outpaint/move default 1.0 (fully new content), upscale 0.3 (per-tile
            refinement). Refused for edit/generate. Fewer steps run: ``steps * strength``
            rounded as diffusers does (see ``operations.effective_steps``).
        mask: inpaint: white (>= 128 luminance) = repaint, any size (stretched to the image's);
            move: optional silhouette of the object inside ``move.box``.
        boxes: inpaint: relative boxes to repaint (united with ``mask``).
        outpaint: the canvas extension (required for outpaint).
        move: the object manipulation (required for move).
        upscale: tiling (upscale only; default ``UpscaleSpec()``).
        loras: ``(local .safetensors path, scale)`` pairs (lists are accepted and become tuples)
            applied for this request only, at most ``MAX_LORAS``.

    Raises:
        ValueError: from ``__post_init__`` when a field is out of range or does not apply to
            the operation.
    """

    operation: str
    prompt: str
    negative_prompt: str | None
    steps: int
    true_cfg_scale: float
    seed: int
    images: list[Image.Image] = field(default_factory=list, repr=False)
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    mask: Image.Image | None = field(default=None, repr=False)
    boxes: list[Box] = field(default_factory=list)
    outpaint: OutpaintSpec | None = None
    move: MoveSpec | None = None
    upscale: UpscaleSpec | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        op = self.operation
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; expected one of {OPERATIONS}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.num_images <= MAX_NUM_IMAGES:
            raise ValueError(f"num_images must be in [1, {MAX_NUM_IMAGES}], got {self.num_images}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**64 - 1], got {self.seed}")
        if self.true_cfg_scale < 0:
            raise ValueError(f"true_cfg_scale must be >= 0, got {self.true_cfg_scale}")
        if op in ("edit", "generate") and not self.prompt:
            raise ValueError(f"{op} needs a prompt")
        self._check_images()
        maximum = MAX_UPSCALE_SIDE if op == "upscale" else MAX_NATIVE_SIDE
        if op in ("inpaint", "outpaint", "move") and (self.width is not None or self.height is not None):
            raise ValueError(f"{op} outputs the input's size (outpaint: the new canvas); width/height do not apply")
        _check_side("width", self.width, maximum)
        _check_side("height", self.height, maximum)
        if self.strength is not None:
            if op in ("edit", "generate"):
                raise ValueError(f"strength does not apply to {op}")
            if not MIN_STRENGTH <= self.strength <= 1.0:
                raise ValueError(f"strength must be in [{MIN_STRENGTH}, 1], got {self.strength}")
        if self.mask is not None and op not in ("inpaint", "move"):
            raise ValueError(f"a mask does not apply to {op}")
        if self.boxes:
            if op != "inpaint":
                raise ValueError(f"boxes do not apply to {op}")
            if len(self.boxes) > MAX_BOXES:
                raise ValueError(f"at most {MAX_BOXES} boxes, got {len(self.boxes)}")
            object.__setattr__(self, "boxes", [check_box(b) for b in self.boxes])
        if op == "inpaint" and self.mask is None and not self.boxes:
            raise ValueError("inpaint needs a mask or boxes")
        for name, spec_type in (("outpaint", OutpaintSpec), ("move", MoveSpec), ("upscale", UpscaleSpec)):
            spec = getattr(self, name)
            if spec is not None and op != name:
                raise ValueError(f"{name} does not apply to {op}")
            if spec is not None and not isinstance(spec, spec_type):
                raise ValueError(f"{name} must be a {spec_type.__name__}, got {type(spec).__name__}")
        if op in ("outpaint", "move") and getattr(self, op) is None:
            raise ValueError(f"{op} needs its {op} spec")
        if len(self.loras) > MAX_LORAS:
            raise ValueError(f"at most {MAX_LORAS} LoRAs per request, got {len(self.loras)}")
        loras = []
        for lora in self.loras:
            if (not isinstance(lora, (tuple, list)) or len(lora) != 2 or not isinstance(lora[0], str)
                    or isinstance(lora[1], bool) or not isinstance(lora[1], (int, float))
                    or not math.isfinite(lora[1])):
                raise ValueError(f"a LoRA is a (path, scale) pair, got {lora!r}")
            loras.append((lora[0], float(lora[1])))
        object.__setattr__(self, "loras", loras)

    def _check_images(self) -> None:
        op, count = self.operation, len(self.images)
        if op == "edit" and not 1 <= count <= 1 + MAX_REFERENCE_IMAGES:
            raise ValueError(f"an edit takes one image plus up to {MAX_REFERENCE_IMAGES} references, got {count}")
        if op == "generate" and count:
            raise ValueError(f"generate takes no input image, got {count}")
        if op not in ("edit", "generate") and count != 1:
            raise ValueError(f"{op} takes exactly one input image, got {count}")


class InvalidRequest(ValueError):
    """The request is well-formed but cannot be rendered as asked, found out at render time
    (e.g. an all-black mask, an outpaint target smaller than the input, a LoRA file that does
    not fit the model). The job's input is at fault, not the worker: do not retry."""


class UnsupportedOperation(InvalidRequest):
    """The loaded model does not serve the request's operation (a text-to-image model asked for
    an edit): the job was routed to the wrong model's workers. Its message names the operations
    the model serves, in words a tenant may read. Do not retry on this worker."""


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

    def identity(self) -> dict[str, str]:
        """What this process loaded, for operators and audits (the ``editfarm_model_info`` metric): the
        pipeline class and a fingerprint of the weights as loaded. A stand-in has neither."""
        return {"pipeline": "standin", "weights": ""}

    @abstractmethod
    def render(self, request: RenderRequest, on_step: StepCallback | None = None, *,
               previews: Previews | None = None) -> list[Image.Image]:
        """Run ``request`` and return ``request.num_images`` images: RGB, or RGBA when
        ``request.images[0]`` has an alpha channel (not for generate).

        ``previews``: small preview images to hand out while rendering (None: none).

        ``on_step`` is called after every denoising step with the request's overall counts
        (a tiled upscale counts tiles x steps); if it returns False the render stops and
        ``RenderInterrupted`` is raised. Exceptions raised by ``on_step`` propagate.

        Raises:
            RenderInterrupted: the callback asked to stop.
            InvalidRequest: the request's content cannot be rendered (see the class).
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
