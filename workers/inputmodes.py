"""What a decoded input image becomes before the pipeline sees it: upright, and 8-bit RGB or RGBA.

Upright: the EXIF ``Orientation`` tag (JPEG, and PNG/WebP that carry EXIF) is applied, as every
browser and photo viewer does, so a phone's portrait photo stored landscape with Orientation=6
is rendered portrait. The result carries no orientation tag any more.

Modes, as Pillow opens PNG, JPEG and WebP (and a few it can build in memory):

============================ ==================================================================
mode                         becomes
============================ ==================================================================
RGB, RGBA                    itself
1, L, P, CMYK, YCbCr, ...    RGB (Pillow's conversion; a palette's colours, CMYK's ink inverted)
LA, PA, La, RGBa             RGBA (premultiplied alpha un-premultiplied by Pillow)
P, L, RGB + transparency     RGBA (the transparent entry / colour gets alpha 0)
I;16, I;16B, I;16L, I;16N    RGB: grey scaled from 0..65535 to 0..255 (``round(v / 257)``), not
                             clipped (Pillow's own conversion turns 40000 into 255, white);
                             a 16-bit ``transparency`` value becomes alpha 0 (RGBA)
I (32-bit integer)           as 16-bit: Pillow opens 16-bit grey PNGs as ``I`` in some versions;
                             values outside 0..65535 are clipped first
F (32-bit float)             RGB: grey on Pillow's 0..255 scale, rounded and clipped
============================ ==================================================================
"""

from __future__ import annotations

import logging

from PIL import Image, ImageOps

__all__ = ["ALPHA_MODES", "has_alpha", "to_grey8", "to_render_mode", "upright"]

log = logging.getLogger("editfarm.inputs")

ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_U16_MAX = 65535


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has an alpha channel or a transparent palette entry / colour."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF Orientation says (a copy; ``image`` itself if it has none).

    A malformed EXIF block is ignored (the image is used as stored) rather than failing the job:
    the pixels are fine, only the hint is unreadable.
    """
    try:
        orientation = image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - Pillow raises many types for a broken EXIF block
        log.info("an input's EXIF block is unreadable; used as stored")
        return image
    if orientation in (None, 1):
        return image
    try:
        turned = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - as above
        log.info("an input's EXIF orientation %r could not be applied; used as stored", orientation)
        return image
    return turned if turned is not None else image


def to_grey8(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grey image as 8-bit "L" (see the module doc for the scales)."""
    import numpy as np  # here: the webhook worker's slim image imports this module and has no numpy

    values = np.asarray(image)
    if image.mode == "F":
        grey = np.clip(np.rint(values), 0, 255)
    else:
        wide = np.clip(values.astype(np.int64), 0, _U16_MAX)
        grey = (wide * 255 + _U16_MAX // 2) // _U16_MAX  # round(v / 257) in integers
    return Image.fromarray(grey.astype(np.uint8), "L")


def _wide_alpha(image: Image.Image) -> Image.Image | None:
    """The alpha of a 16-bit grey image with a ``transparency`` value (None without one)."""
    transparent = image.info.get("transparency")
    if image.mode not in _WIDE_GREY_MODES or not isinstance(transparent, int):
        return None
    import numpy as np  # as in to_grey8

    values = np.asarray(image).astype(np.int64)
    return Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")


def to_render_mode(image: Image.Image) -> Image.Image:
    """``image`` as RGBA if it has alpha (see :func:`has_alpha`), else RGB (module doc: per mode)."""
    if image.mode in _WIDE_GREY_MODES or image.mode == "F":
        alpha = _wide_alpha(image)
        rgb = to_grey8(image).convert("RGB")
        if alpha is None:
            return rgb
        rgb.putalpha(alpha)
        return rgb
    if has_alpha(image):
        return image if image.mode == "RGBA" else image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")
