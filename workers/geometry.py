"""Plain image geometry for the render operations: masks, canvases, cut/paste, tiles, blending.

Pure functions over PIL images and numpy arrays: no torch, no model. Exact and cheap on CPU.

Conventions:

* ``Size`` is ``(width, height)`` in px, as PIL uses it.
* ``Rect`` is ``(x0, y0, x1, y1)`` in px, ``x1``/``y1`` exclusive (PIL's box convention), so
  its size is ``(x1 - x0, y1 - y0)``.
* A relative box is ``(x0, y0, x1, y1)`` in ``[0, 1]`` of the image's width/height.
* A mask is a PIL "L" image; 255 (white) marks pixels to repaint, 0 pixels to keep. Helpers
  that return masks return binary ones (only 0 and 255) unless they say otherwise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "Rect",
    "Size",
    "attach_alpha",
    "axis_starts",
    "binarize",
    "blend_tiles",
    "box_to_rect",
    "clip_rect",
    "composite",
    "context_region",
    "derive_seed",
    "dilate",
    "erode",
    "expand_canvas",
    "fit_size",
    "mask_bbox",
    "mask_from_boxes",
    "move_object",
    "one_megapixel_size",
    "outpaint_margins",
    "split_alpha",
    "tile_plan",
    "tile_weights",
    "upscale_target",
]

Size = tuple[int, int]
Rect = tuple[int, int, int, int]


# -- boxes and masks ---------------------------------------------------------------------------


def box_to_rect(box: Sequence[float], size: Size) -> Rect:
    """The px rect covering every pixel that the relative ``box`` touches in an image of ``size``.

    ``x0``/``y0`` are floored and ``x1``/``y1`` ceiled, then clipped to the image, and a box
    thinner than a pixel still covers one pixel. E.g. ``(0.25, 0, 0.5, 1)`` of a 100x10 image
    is ``(25, 0, 50, 10)``; ``(0.251, 0, 0.502, 1)`` is ``(25, 0, 51, 10)``.
    """
    width, height = size
    x0, y0, x1, y1 = box
    # The small tolerance keeps 0.3 * 100 = 30.000000000000004 from ceiling to 31.
    rx0 = min(max(math.floor(x0 * width + 1e-9), 0), width - 1)
    ry0 = min(max(math.floor(y0 * height + 1e-9), 0), height - 1)
    rx1 = max(min(math.ceil(x1 * width - 1e-9), width), rx0 + 1)
    ry1 = max(min(math.ceil(y1 * height - 1e-9), height), ry0 + 1)
    return (rx0, ry0, rx1, ry1)


def mask_from_boxes(size: Size, boxes: Iterable[Sequence[float]]) -> Image.Image:
    """A binary mask of ``size``: 255 inside the union of the relative ``boxes`` (see
    ``box_to_rect`` for which pixels a box covers), 0 elsewhere."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for box in boxes:
        x0, y0, x1, y1 = box_to_rect(box, size)
        mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask, "L")


def binarize(mask: Image.Image, size: Size | None = None, threshold: int = 128) -> Image.Image:
    """``mask`` as a binary "L" mask: luminance >= ``threshold`` becomes 255, the rest 0.

    With ``size``, a mask of another size is first stretched to it (bilinear), so a mask made
    for a differently scaled copy of the image still lines up.
    """
    gray = mask.convert("L")
    if size is not None and gray.size != tuple(size):
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(gray)
    return Image.fromarray(np.where(array >= threshold, 255, 0).astype(np.uint8), "L")


def mask_bbox(mask: Image.Image) -> Rect | None:
    """The smallest rect holding every non-zero pixel of ``mask``, or None if it has none."""
    box = mask.getbbox()
    return None if box is None else (box[0], box[1], box[2], box[3])


def _max_filter_1d(array: np.ndarray, radius: int, axis: int) -> np.ndarray:
    padded = np.pad(array, [(radius, radius) if a == axis else (0, 0) for a in range(array.ndim)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
    return windows.max(axis=-1)


def dilate(mask: Image.Image, px: int) -> Image.Image:
    """Grow the non-zero area of an "L" mask by ``px`` pixels in every direction (a square
    structuring element, so corners grow diagonally too). ``px <= 0`` returns a copy."""
    if px <= 0:
        return mask.copy()
    array = np.asarray(mask.convert("L"))
    grown = _max_filter_1d(_max_filter_1d(array, px, 0), px, 1)
    return Image.fromarray(np.ascontiguousarray(grown), "L")


def erode(mask: Image.Image, px: int) -> Image.Image:
    """Shrink the non-zero area of a binary "L" mask by ``px`` pixels (a square structuring
    element). Pixels beyond the image border count as set, so an area touching the border
    does not shrink away from it. ``px <= 0`` returns a copy."""
    if px <= 0:
        return mask.copy()
    array = np.asarray(mask.convert("L"))
    outside = Image.fromarray(np.where(array > 0, 0, 255).astype(np.uint8), "L")
    grown = np.asarray(dilate(outside, px))
    return Image.fromarray(np.where(grown > 0, 0, 255).astype(np.uint8), "L")


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` where ``mask`` is 255, ``original`` where it is 0, a linear mix between.

    Pixels where the mask is 0 are copied from ``original`` bit for bit. The three images must
    have the same size; ``generated`` is converted to ``original``'s mode.
    """
    if not (original.size == generated.size == mask.size):
        raise ValueError(f"sizes differ: {original.size}, {generated.size}, {mask.size}")
    return Image.composite(generated.convert(original.mode), original, mask.convert("L"))


def clip_rect(rect: Rect, size: Size) -> Rect | None:
    """``rect`` intersected with an image of ``size``; None if nothing is left."""
    x0, y0 = max(rect[0], 0), max(rect[1], 0)
    x1, y1 = min(rect[2], size[0]), min(rect[3], size[1])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def context_region(size: Size, bbox: Rect, max_pixels: int, min_context: int = 64,
                   context_ratio: float = 0.25) -> Rect:
    """The part of an image of ``size`` to render when repainting ``bbox``.

    The whole image when it has at most ``max_pixels`` pixels (full context is best);
    otherwise ``bbox`` grown on each side by ``max(min_context, context_ratio * its longer
    side)`` px, clipped to the image.
    """
    width, height = size
    if width * height <= max_pixels:
        return (0, 0, width, height)
    pad = max(min_context, round(context_ratio * max(bbox[2] - bbox[0], bbox[3] - bbox[1])))
    x0, y0, x1, y1 = bbox
    return (max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, width), min(y1 + pad, height))


def fit_size(size: Size, max_pixels: int, multiple: int = 16) -> Size:
    """The size to render ``size`` at: scaled down (never up) to at most ~``max_pixels``,
    keeping the aspect ratio, each side rounded to the nearest multiple of ``multiple``
    (at least ``multiple``). E.g. (100, 70) -> (96, 64); (4000, 3000) at 1 MP -> (1184, 880)."""
    width, height = size
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    return (max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple))


def one_megapixel_size(size: Size) -> Size:
    """The ~1 MP size (multiples of 32) with ``size``'s aspect ratio that Qwen-Image-Edit
    renders at when no output size is given (diffusers' ``calculate_dimensions``)."""
    ratio = size[0] / size[1]
    width = math.sqrt(1024 * 1024 * ratio)
    height = width / ratio
    return (round(width / 32) * 32, round(height / 32) * 32)


# -- outpaint ----------------------------------------------------------------------------------


def outpaint_margins(size: Size, target: Size, direction: str = "center") -> tuple[int, int, int, int]:
    """Margins ``(left, top, right, bottom)`` in px that grow ``size`` to ``target``.

    ``direction`` says where the new area goes: "left", "right", "top", "bottom", a corner
    such as "top-left", or "center". An axis the direction does not name is split evenly,
    the odd pixel going right/bottom.

    Raises:
        ValueError: ``target`` is smaller than ``size`` on an axis, or an unknown direction.
    """
    (width, height), (target_w, target_h) = size, target
    if target_w < width or target_h < height:
        raise ValueError(f"outpaint target {target} is smaller than the image {size}")
    parts = set(direction.split("-"))
    if not parts <= {"center", "left", "right", "top", "bottom"} or len(parts) > 2 \
            or {"left", "right"} <= parts or {"top", "bottom"} <= parts:
        raise ValueError(f"unknown outpaint direction {direction!r}")
    grow_x, grow_y = target_w - width, target_h - height
    if "left" in parts:
        left = grow_x
    elif "right" in parts:
        left = 0
    else:
        left = grow_x // 2
    if "top" in parts:
        top = grow_y
    elif "bottom" in parts:
        top = 0
    else:
        top = grow_y // 2
    return (left, top, grow_x - left, grow_y - top)


def expand_canvas(image: Image.Image, left: int, top: int, right: int,
                  bottom: int) -> tuple[Image.Image, Image.Image]:
    """Extend ``image`` by the given margins (px).

    Returns ``(canvas, mask)``: the canvas is ``(w + left + right, h + top + bottom)`` with
    ``image`` pasted unchanged at ``(left, top)`` and the new area filled by repeating the
    nearest edge pixel (a neutral start for partial-strength repainting); the mask is 255 on
    the new area and 0 on the original pixels.
    """
    array = np.asarray(image)
    pad = [(top, bottom), (left, right)] + [(0, 0)] * (array.ndim - 2)
    canvas = Image.fromarray(np.pad(array, pad, mode="edge"), image.mode)
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


# -- move --------------------------------------------------------------------------------------


def move_object(image: Image.Image, rect: Rect, dx: int, dy: int, scale: float,
                object_mask: Image.Image | None = None) -> tuple[Image.Image, Image.Image, Image.Image, Rect]:
    """Cut the object at ``rect`` (px) out of ``image``, scale it by ``scale`` about its centre,
    move its centre by ``(dx, dy)`` px and paste it back.

    The destination rect has size ``(max(1, round(w * scale)), max(1, round(h * scale)))`` and
    its top-left corner at ``centre + (dx, dy) - size / 2`` rounded half up; the object is resized with
    Lanczos, and parts falling outside the image are cut off.

    ``object_mask`` (an "L" mask the size of ``image``; only its part inside ``rect`` counts)
    is the object's silhouette; without it the whole rect is the object.

    Returns ``(canvas, pasted, vacated, dest_rect)``: the image with the object pasted on top
    (the source pixels are left as they were), the binary mask of the pasted pixels, the
    binary mask of object pixels at the source that the pasted object does not cover (to be
    repainted), and the unclipped destination rect.
    """
    x0, y0, x1, y1 = rect
    width, height = x1 - x0, y1 - y0
    obj = image.crop(rect)
    if object_mask is None:
        silhouette = Image.new("L", (width, height), 255)
    else:
        silhouette = binarize(object_mask, image.size).crop(rect)
    source = Image.new("L", image.size, 0)
    source.paste(silhouette, (x0, y0))
    dest_w, dest_h = max(1, round(width * scale)), max(1, round(height * scale))
    dest_x0 = math.floor((x0 + x1) / 2 + dx - dest_w / 2 + 0.5)  # halves round up, not to even
    dest_y0 = math.floor((y0 + y1) / 2 + dy - dest_h / 2 + 0.5)
    dest = (dest_x0, dest_y0, dest_x0 + dest_w, dest_y0 + dest_h)
    if (dest_w, dest_h) != (width, height):
        obj = obj.resize((dest_w, dest_h), Image.Resampling.LANCZOS)
        silhouette = binarize(silhouette.resize((dest_w, dest_h), Image.Resampling.BILINEAR))
    pasted = Image.new("L", image.size, 0)
    # PIL's paste clips a partly (or wholly) outside destination by itself.
    pasted.paste(silhouette, (dest_x0, dest_y0))
    canvas = image.copy()
    canvas.paste(obj, (dest_x0, dest_y0), silhouette)
    vacated = np.where((np.asarray(source) > 0) & (np.asarray(pasted) == 0), 255, 0).astype(np.uint8)
    return canvas, pasted, Image.fromarray(vacated, "L"), dest


# -- upscale: tiles and blending ---------------------------------------------------------------


def upscale_target(size: Size, scale: float, maximum: int, multiple: int = 16) -> Size:
    """``size`` times ``scale``, each side rounded to a multiple of ``multiple`` (at least one),
    shrunk if needed so that neither side exceeds ``maximum``, keeping the aspect ratio."""
    width, height = size[0] * scale, size[1] * scale
    shrink = min(1.0, maximum / width, maximum / height)
    return (max(multiple, min(maximum, round(width * shrink / multiple) * multiple)),
            max(multiple, min(maximum, round(height * shrink / multiple) * multiple)))


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets (px) of tiles of side ``min(tile, length)`` covering ``[0, length)`` with
    neighbours overlapping by at least ``overlap`` px, spread evenly (the first starts at 0, the
    last ends at ``length``). Needs ``0 <= overlap < tile``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    span = length - tile
    return [round(i * span / (count - 1)) for i in range(count)]


def tile_plan(size: Size, tile: int, overlap: int) -> list[Rect]:
    """Tiles (row by row, top to bottom, left to right) covering an image of ``size``: each is
    ``min(tile, width)`` x ``min(tile, height)`` px and overlaps its neighbours by at least
    ``overlap`` px (see ``axis_starts``)."""
    tile_w, tile_h = min(tile, size[0]), min(tile, size[1])
    xs = axis_starts(size[0], tile, overlap)
    ys = axis_starts(size[1], tile, overlap)
    return [(x, y, x + tile_w, y + tile_h) for y in ys for x in xs]


def _axis_ramp(start: int, end: int, previous_end: int | None, next_start: int | None) -> np.ndarray:
    """Weights along one axis of a tile: rising linearly across the overlap with the previous
    tile, falling across the overlap with the next one, 1 elsewhere; never 0."""
    positions = np.arange(start, end, dtype=np.float32) + 0.5
    weights = np.ones(end - start, dtype=np.float32)
    if previous_end is not None and previous_end > start:
        weights = np.minimum(weights, (positions - start) / (previous_end - start))
    if next_start is not None and next_start < end:
        weights = np.minimum(weights, (end - positions) / (end - next_start))
    return weights


def tile_weights(rect: Rect, plan: Sequence[Rect]) -> np.ndarray:
    """Feather weights (float32, shape ``(h, w)``) of the tile ``rect`` of ``plan``: a linear
    ramp across each overlap with a neighbouring tile (so two overlapping tiles cross-fade),
    1 in the tile's own area and along the image border. Strictly positive everywhere."""
    x0, y0, x1, y1 = rect
    xs = sorted({r[0] for r in plan})
    ys = sorted({r[1] for r in plan})
    tile_w, tile_h = x1 - x0, y1 - y0
    ix, iy = xs.index(x0), ys.index(y0)
    wx = _axis_ramp(x0, x1, xs[ix - 1] + tile_w if ix > 0 else None, xs[ix + 1] if ix + 1 < len(xs) else None)
    wy = _axis_ramp(y0, y1, ys[iy - 1] + tile_h if iy > 0 else None, ys[iy + 1] if iy + 1 < len(ys) else None)
    return np.outer(wy, wx)


def blend_tiles(size: Size, tiles: Sequence[tuple[Rect, Image.Image]]) -> Image.Image:
    """Assemble an RGB image of ``size`` from ``(rect, tile image)`` pairs of one ``tile_plan``:
    each pixel is the ``tile_weights``-weighted mean of the tiles covering it, rounded.

    Tiles cut from one image reassemble it exactly. Raises ValueError if a tile's image is not
    its rect's size or a pixel is covered by no tile.
    """
    plan = [rect for rect, _ in tiles]
    total = np.zeros((size[1], size[0], 3), dtype=np.float32)
    weight_sum = np.zeros((size[1], size[0], 1), dtype=np.float32)
    for rect, image in tiles:
        x0, y0, x1, y1 = rect
        if image.size != (x1 - x0, y1 - y0):
            raise ValueError(f"tile image {image.size} does not fit rect {rect}")
        weights = tile_weights(rect, plan)[:, :, None]
        total[y0:y1, x0:x1] += np.asarray(image.convert("RGB"), dtype=np.float32) * weights
        weight_sum[y0:y1, x0:x1] += weights
    if (weight_sum <= 0).any():
        raise ValueError("the tiles do not cover the image")
    blended = np.rint(total / weight_sum)
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")


# -- alpha and seeds ---------------------------------------------------------------------------


def split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """``(rgb, alpha)``: the image as RGB and its alpha channel as "L", or None if it has none
    (modes RGBA, LA, PA, RGBa, La, and P or L/RGB with a ``transparency`` entry have one)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return (image if image.mode == "RGB" else image.convert("RGB")), None
    rgba = image.convert("RGBA")
    return rgba.convert("RGB"), rgba.getchannel("A")


def attach_alpha(rgb: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """``rgb`` with ``alpha`` as its alpha channel (resized with Lanczos to ``rgb``'s size if
    it differs); ``rgb`` itself as RGB when ``alpha`` is None."""
    rgb = rgb.convert("RGB")
    if alpha is None:
        return rgb
    if alpha.size != rgb.size:
        alpha = alpha.resize(rgb.size, Image.Resampling.LANCZOS)
    rgba = rgb.copy()
    rgba.putalpha(alpha.convert("L"))
    return rgba


def derive_seed(seed: int, *salt: int) -> int:
    """A 64-bit seed derived from ``seed`` and ``salt`` (e.g. a tile index): deterministic on
    every platform, and unrelated for different salts."""
    data = b"".join(int(v).to_bytes(8, "little", signed=False) for v in (seed % 2**64, *salt))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
