"""The render operations, orchestrated over a model's primitive calls.

A ``Painter`` (``DiffusersRenderer`` in production, a fake in unit tests) offers four
primitives: ``edit``, ``generate``, ``inpaint`` and ``img2img``, each one pipeline call at a
size the model can render. This module turns a ``RenderRequest`` into those calls with the
image geometry of ``workers.geometry``. It imports neither torch nor diffusers.

What comes out, per operation (``output_size`` computes it before rendering):

========== ==================================================================================
edit       ``width`` x ``height`` if given (one given: the other follows the main image's
           aspect, rounded to 16, capped at 1024); else ~1 MP with the main image's aspect, sides multiples
           of 32 (``geometry.one_megapixel_size``: a 3:2 input gives 1248 x 832). With
           reference images (``images[1:]``) the multi-image edit pipeline runs.
generate   ``width`` x ``height``, 1024 x 1024 by default (a missing side is 1024).
inpaint    exactly the input's size. Pixels outside the mask (``mask`` united with
           ``boxes``) are the input's, bit for bit.
outpaint   exactly the new canvas: input + margins. The input's pixels are kept bit for bit.
move       exactly the input's size. Pixels outside the vacated area and the seam band are
           the input's or the pasted object's, bit for bit.
upscale    exactly the target: ``width`` x ``height`` (one given: the other follows the
           aspect, capped at 2048), else the input times ``upscale.scale`` (default 2) rounded to 16 and
           shrunk to fit 2048; enlarged with Lanczos, then refined tile by tile.
========== ==================================================================================

Inpaint, outpaint and move share one repaint path: the area to render is the whole canvas
when it has at most ``MAX_WORK_PIXELS`` pixels, else the mask's bounding box plus context
around it; that area is scaled to fit ``MAX_WORK_PIXELS`` (sides multiples of 16), inpainted
with the mask grown by ``PIPELINE_MASK_GROW`` px, scaled back, and composited into the canvas
through the exact mask.

Alpha: an alpha channel in ``images[0]`` is carried to the output (RGBA out; the model
renders RGB). edit/upscale: the input's alpha resized to the output; inpaint: the input's
alpha unchanged; move: the input's alpha with the object's alpha cut and pasted like its
pixels; outpaint: the input's alpha at its place on the canvas, the new area opaque.
generate: always RGB.

Progress: ``on_step(done, total)`` counts the request's denoising steps
(``planned_steps``): ``steps`` for edit/generate, ``effective_steps(steps, strength)`` for
inpaint/outpaint/move, and tiles x that for upscale. A False return stops the render within
one step and raises ``RenderInterrupted(done, total)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
from PIL import Image

from workers import geometry
from workers.geometry import Size
from workers.pipeline.base import (
    MAX_CANVAS_SIDE,
    MAX_NATIVE_SIDE,
    MAX_UPSCALE_SIDE,
    InvalidRequest,
    RenderInterrupted,
    RenderRequest,
    StepCallback,
    UpscaleSpec,
)

__all__ = [
    "DEFAULT_STRENGTH",
    "MAX_WORK_PIXELS",
    "PIPELINE_MASK_GROW",
    "Painter",
    "Sampling",
    "effective_steps",
    "move_masks",
    "no_tiling",
    "output_size",
    "planned_steps",
    "run",
    "run_edit",
    "run_generate",
    "run_inpaint",
    "run_move",
    "run_outpaint",
    "run_upscale",
    "seeds_for",
]

# The model renders at most about this many pixels per pipeline call (1 MP, its native size).
MAX_WORK_PIXELS = 1024 * 1024
# The mask handed to the inpaint pipeline is grown by one latent cell (the VAE's 8 px), so
# every masked pixel lies in a fully repainted cell; the composite uses the exact mask.
PIPELINE_MASK_GROW = 8
DEFAULT_STRENGTH: dict[str, float] = {"inpaint": 1.0, "outpaint": 1.0, "move": 1.0, "upscale": 0.3}
DEFAULT_GENERATE_SIDE = 1024


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What every primitive call shares.

    Attributes:
        prompt, negative_prompt, steps, true_cfg_scale: as in ``RenderRequest``.
        seeds: one per output image; output ``k`` starts from noise seeded with ``seeds[k]``.
    """

    prompt: str
    negative_prompt: str | None
    steps: int
    true_cfg_scale: float
    seeds: tuple[int, ...]


class Painter(Protocol):
    """The model primitives. Each returns ``len(sampling.seeds)`` RGB images, calls
    ``on_step(step, total)`` after each denoising step of that one call, and raises
    ``RenderInterrupted`` when it returns False."""

    def edit(self, images: list[Image.Image], sampling: Sampling, size: Size,
             on_step: StepCallback | None) -> list[Image.Image]:
        """Instruction edit of ``images[0]`` (``images[1:]``: references) rendered at ``size``."""
        ...

    def generate(self, sampling: Sampling, size: Size, on_step: StepCallback | None) -> list[Image.Image]:
        """Text to image at ``size``."""
        ...

    def inpaint(self, image: Image.Image, mask: Image.Image, sampling: Sampling, strength: float,
                on_step: StepCallback | None) -> list[Image.Image]:
        """Repaint where ``mask`` is white; ``image.size`` (multiples of 16) in and out."""
        ...

    def img2img(self, image: Image.Image, sampling: Sampling, strength: float,
                on_step: StepCallback | None) -> list[Image.Image]:
        """Re-noise ``image`` to ``strength`` and denoise; ``image.size`` in and out."""
        ...

    def tiled_vae(self) -> contextlib.AbstractContextManager[None]:
        """A context in which the VAE works in tiles (if it can)."""
        ...


# -- planning ----------------------------------------------------------------------------------


def seeds_for(seed: int, count: int) -> tuple[int, ...]:
    """The noise seeds of a request's ``count`` outputs: ``(seed + k) mod 2**64``."""
    return tuple((seed + k) % 2**64 for k in range(count))


def effective_steps(steps: int, strength: float) -> int:
    """Denoising steps a ``strength``-limited pipeline call runs out of ``steps`` (diffusers'
    ``get_timesteps``: it skips ``int(steps - steps * strength)`` of them). At least 1 for
    ``strength >= MIN_STRENGTH``."""
    init = min(steps * strength, steps)
    return steps - int(max(steps - init, 0))


def _strength(request: RenderRequest) -> float:
    if request.strength is not None:
        return request.strength
    return DEFAULT_STRENGTH[request.operation]


def _follow_aspect(width: int | None, height: int | None, aspect_of: Size, maximum: int) -> Size:
    """Fill the missing one of ``width``/``height`` from ``aspect_of``'s aspect (multiple of 16,
    within ``[16, maximum]``); both given are returned as they are."""
    ratio = aspect_of[0] / aspect_of[1]
    if width is not None and height is not None:
        return (width, height)
    if width is not None:
        return (width, min(maximum, max(16, round(width / ratio / 16) * 16)))
    assert height is not None
    return (min(maximum, max(16, round(height * ratio / 16) * 16)), height)


def _outpaint_margins(request: RenderRequest) -> tuple[int, int, int, int]:
    spec = request.outpaint
    assert spec is not None
    size = request.images[0].size
    if spec.width is None and spec.height is None:
        margins = (spec.left, spec.top, spec.right, spec.bottom)
    else:
        target = (spec.width or size[0], spec.height or size[1])
        try:
            margins = geometry.outpaint_margins(size, target, spec.direction)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    canvas = (size[0] + margins[0] + margins[2], size[1] + margins[1] + margins[3])
    if max(canvas) > MAX_CANVAS_SIDE:
        raise InvalidRequest(f"the outpainted canvas {canvas} exceeds {MAX_CANVAS_SIDE} px per side")
    return margins


def _upscale_size(request: RenderRequest) -> Size:
    size = request.images[0].size
    if request.width is None and request.height is None:
        spec = request.upscale or UpscaleSpec()
        return geometry.upscale_target(size, spec.scale, MAX_UPSCALE_SIDE)
    return _follow_aspect(request.width, request.height, size, MAX_UPSCALE_SIDE)


def output_size(request: RenderRequest) -> Size:
    """The ``(width, height)`` every output of ``request`` will have (see the module doc).

    Raises:
        InvalidRequest: an outpaint target smaller than the input, or a canvas too large.
    """
    op = request.operation
    if op == "edit":
        if request.width is None and request.height is None:
            return geometry.one_megapixel_size(request.images[0].size)
        return _follow_aspect(request.width, request.height, request.images[0].size, MAX_NATIVE_SIDE)
    if op == "generate":
        return (request.width or DEFAULT_GENERATE_SIDE, request.height or DEFAULT_GENERATE_SIDE)
    if op == "outpaint":
        left, top, right, bottom = _outpaint_margins(request)
        width, height = request.images[0].size
        return (width + left + right, height + top + bottom)
    if op == "upscale":
        return _upscale_size(request)
    return request.images[0].size


def _upscale_plan(request: RenderRequest) -> list[geometry.Rect]:
    spec = request.upscale or UpscaleSpec()
    return geometry.tile_plan(_upscale_size(request), spec.tile, spec.overlap)


def planned_steps(request: RenderRequest) -> int:
    """The ``total`` that ``on_step`` will report for ``request`` (see the module doc)."""
    op = request.operation
    if op in ("edit", "generate"):
        return request.steps
    per_call = effective_steps(request.steps, _strength(request))
    if op == "upscale":
        return len(_upscale_plan(request)) * per_call
    return per_call


def _sampling(request: RenderRequest) -> Sampling:
    return Sampling(prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                    true_cfg_scale=request.true_cfg_scale, seeds=seeds_for(request.seed, request.num_images))


# -- operations --------------------------------------------------------------------------------


def run(painter: Painter, request: RenderRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
    """Render ``request`` on ``painter``: ``request.num_images`` images (module doc: sizes,
    alpha, progress).

    Raises:
        RenderInterrupted: ``on_step`` returned False.
        InvalidRequest: the request's content cannot be rendered (empty mask, a move that
            changes nothing, an outpaint target smaller than the input, ...).
    """
    runners: dict[str, Callable[[Painter, RenderRequest, StepCallback | None], list[Image.Image]]] = {
        "edit": run_edit,
        "generate": run_generate,
        "inpaint": run_inpaint,
        "outpaint": run_outpaint,
        "move": run_move,
        "upscale": run_upscale,
    }
    return runners[request.operation](painter, request, on_step)


def run_edit(painter: Painter, request: RenderRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
    """Instruction edit of ``images[0]``, with ``images[1:]`` as references; alpha of
    ``images[0]`` resized onto the outputs."""
    main, alpha = geometry.split_alpha(request.images[0])
    references = [geometry.split_alpha(image)[0] for image in request.images[1:]]
    outputs = painter.edit([main, *references], _sampling(request), output_size(request), on_step)
    return [geometry.attach_alpha(image, alpha) for image in outputs]


def run_generate(painter: Painter, request: RenderRequest,
                 on_step: StepCallback | None = None) -> list[Image.Image]:
    """Text to image at ``output_size(request)``; RGB."""
    return [image.convert("RGB") for image in
            painter.generate(_sampling(request), output_size(request), on_step)]


def _repaint(painter: Painter, canvas: Image.Image, mask: Image.Image, sampling: Sampling, strength: float,
             on_step: StepCallback | None) -> list[Image.Image]:
    """Inpaint ``canvas`` (RGB) where the binary ``mask`` is set; outputs have ``canvas.size`` and
    are ``canvas`` bit for bit where ``mask`` is 0 (see the module doc for the work area)."""
    bbox = geometry.mask_bbox(mask)
    if bbox is None:
        raise InvalidRequest("the mask selects no pixel to repaint")
    region = geometry.context_region(canvas.size, bbox, MAX_WORK_PIXELS)
    crop = canvas.crop(region)
    work = geometry.fit_size(crop.size, MAX_WORK_PIXELS)
    work_image = crop if work == crop.size else crop.resize(work, Image.Resampling.LANCZOS)
    work_mask = geometry.dilate(geometry.binarize(mask.crop(region), work), PIPELINE_MASK_GROW)
    results = []
    for painted in painter.inpaint(work_image, work_mask, sampling, strength, on_step):
        if painted.size != crop.size:
            painted = painted.resize(crop.size, Image.Resampling.LANCZOS)
        full = canvas.copy()
        full.paste(painted.convert("RGB"), region[:2])
        results.append(geometry.composite(canvas, full, mask))
    return results


def run_inpaint(painter: Painter, request: RenderRequest,
                on_step: StepCallback | None = None) -> list[Image.Image]:
    """Repaint the union of ``mask`` and ``boxes``; everything else stays bit for bit."""
    image, alpha = geometry.split_alpha(request.images[0])
    mask = Image.new("L", image.size, 0)
    if request.mask is not None:
        mask = geometry.binarize(request.mask, image.size)
    if request.boxes:
        boxes = geometry.mask_from_boxes(image.size, request.boxes)
        mask = Image.fromarray(np.maximum(np.asarray(mask), np.asarray(boxes)), "L")
    outputs = _repaint(painter, image, mask, _sampling(request), _strength(request), on_step)
    return [geometry.attach_alpha(out, alpha) for out in outputs]


def run_outpaint(painter: Painter, request: RenderRequest,
                 on_step: StepCallback | None = None) -> list[Image.Image]:
    """Extend the canvas by the request's margins and paint the new area; the input's pixels
    stay bit for bit at ``(left, top)``."""
    image, alpha = geometry.split_alpha(request.images[0])
    left, top, right, bottom = _outpaint_margins(request)
    canvas, mask = geometry.expand_canvas(image, left, top, right, bottom)
    outputs = _repaint(painter, canvas, mask, _sampling(request), _strength(request), on_step)
    if alpha is not None:
        opaque = Image.new("L", canvas.size, 255)
        opaque.paste(alpha, (left, top))
        alpha = opaque
    return [geometry.attach_alpha(out, alpha) for out in outputs]


def move_masks(request: RenderRequest) -> tuple[Image.Image, Image.Image, Image.Image]:
    """``(canvas, repaint_mask, pasted_mask)`` of a move request, before any model call: the
    input (RGB) with the object pasted at its new place, the binary mask to repaint (the
    vacated area plus the seam band around the pasted object), and the pasted object's mask."""
    spec = request.move
    assert spec is not None
    image, _ = geometry.split_alpha(request.images[0])
    rect = geometry.box_to_rect(spec.box, image.size)
    canvas, pasted, vacated, _ = geometry.move_object(image, rect, spec.dx, spec.dy, spec.scale, request.mask)
    repaint = np.asarray(vacated) > 0
    if spec.seam > 0:
        inner = spec.seam // 2
        outer = spec.seam - inner
        grown = np.asarray(geometry.dilate(pasted, outer)) > 0
        shrunk = np.asarray(geometry.erode(pasted, inner)) > 0
        repaint |= grown & ~shrunk
    mask = Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8), "L")
    return canvas, mask, pasted


def run_move(painter: Painter, request: RenderRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
    """Cut ``move.box`` (or the ``mask`` silhouette within it), scale it about its centre,
    shift it by ``(dx, dy)`` px, paste it, and repaint the vacated area and the seam band."""
    spec = request.move
    assert spec is not None
    _, alpha = geometry.split_alpha(request.images[0])
    canvas, mask, _ = move_masks(request)
    if geometry.mask_bbox(mask) is None:
        raise InvalidRequest("the move changes nothing (no offset, scale 1 and no seam)")
    outputs = _repaint(painter, canvas, mask, _sampling(request), _strength(request), on_step)
    if alpha is not None:
        rect = geometry.box_to_rect(spec.box, alpha.size)
        alpha = geometry.move_object(alpha, rect, spec.dx, spec.dy, spec.scale, request.mask)[0]
    return [geometry.attach_alpha(out, alpha) for out in outputs]


def run_upscale(painter: Painter, request: RenderRequest,
                on_step: StepCallback | None = None) -> list[Image.Image]:
    """Enlarge to ``output_size(request)`` with Lanczos, refine each tile of the plan with
    img2img at ``strength``, and cross-fade the tiles (``geometry.blend_tiles``). Tile ``i`` of
    output ``k`` is seeded with ``derive_seed(seed + k, i)``."""
    image, alpha = geometry.split_alpha(request.images[0])
    target = output_size(request)
    enlarged = image if image.size == target else image.resize(target, Image.Resampling.LANCZOS)
    plan = _upscale_plan(request)
    strength = _strength(request)
    per_tile = effective_steps(request.steps, strength)
    total = len(plan) * per_tile
    base = _sampling(request)
    tiles: list[list[tuple[geometry.Rect, Image.Image]]] = [[] for _ in range(request.num_images)]
    with painter.tiled_vae():
        for index, rect in enumerate(plan):
            done_before = index * per_tile
            sampling = dataclasses.replace(base, seeds=tuple(geometry.derive_seed(s, index) for s in base.seeds))
            callback = None if on_step is None else _shifted(on_step, done_before, total)
            try:
                painted = painter.img2img(enlarged.crop(rect), sampling, strength, callback)
            except RenderInterrupted as exc:
                raise RenderInterrupted(done_before + exc.steps_done, total) from None
            for k, tile in enumerate(painted):
                tiles[k].append((rect, tile))
    return [geometry.attach_alpha(geometry.blend_tiles(target, parts), alpha) for parts in tiles]


def _shifted(on_step: StepCallback, done_before: int, total: int) -> StepCallback:
    """A per-call callback reporting the request's overall ``(done_before + step, total)``."""

    def callback(step: int, _call_total: int) -> bool:
        return on_step(min(done_before + step, total), total)

    return callback


@contextlib.contextmanager
def no_tiling() -> Iterator[None]:
    """A ``Painter.tiled_vae`` for painters without a VAE (fakes)."""
    yield

