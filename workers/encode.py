"""Image encoding and decoding at the worker's edges (bytes <-> PIL).

Output files (``encode_output``), per format:

====== ============================ =============================================== ==========================
format alpha (RGBA image)           ``dpi``                                          ``quality``
====== ============================ =============================================== ==========================
png    kept                         pHYs chunk (px per metre: reads back as          ignored (lossless)
                                    e.g. 299.9994 for 300 in ``img.info["dpi"]``)
jpeg   flattened onto white         JFIF density, dots per inch (``info["dpi"]``)    1..100, default 95
webp   kept                         EXIF XResolution/YResolution, ResolutionUnit    1..100, default 95 (lossy)
                                    2 (inch): WebP has no density field and Pillow
                                    ignores ``dpi=`` for it; read it back with
                                    ``img.getexif()[282]`` (not ``info["dpi"]``)
====== ============================ =============================================== ==========================

The same image and arguments always give the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image

from broker.schema import OutputFormat
from workers import inputmodes

__all__ = [
    "DEFAULT_QUALITY",
    "MAX_DPI",
    "UnreadableImage",
    "decode_image",
    "decode_mask",
    "decode_rgb",
    "encode",
    "encode_output",
]

_PIL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}
DEFAULT_QUALITY = 95
MAX_DPI = 10000
# EXIF (TIFF) tags for the resolution of a WebP.
_EXIF_X_RESOLUTION, _EXIF_Y_RESOLUTION, _EXIF_RESOLUTION_UNIT, _EXIF_INCH = 282, 283, 296, 2


class UnreadableImage(ValueError):
    """Stored input bytes are not a decodable image."""


def _open(data: bytes) -> Image.Image:
    """The decoded image, upright (EXIF orientation applied), in the mode it was stored in."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return inputmodes.upright(img.copy())
    except Exception as exc:  # Pillow raises many types for bad data
        raise UnreadableImage("input is not a readable image") from exc


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an upright RGB image (alpha dropped). Raises UnreadableImage."""
    return inputmodes.to_render_mode(_open(data)).convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return inputmodes.has_alpha(image)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes, upright, to RGBA if the image has an alpha channel (RGBA, LA, PA, or a
    palette or grey/RGB image with a transparency entry), else to RGB; every mode Pillow opens is
    converted as ``workers.inputmodes`` says (16-bit grey scaled, not clipped). Raises UnreadableImage."""
    return inputmodes.to_render_mode(_open(data))


def decode_mask(data: bytes) -> Image.Image:
    """Decode a mask image, upright, to "L" (luminance; white = repaint). An alpha channel is
    ignored: the mask is its colour. Raises UnreadableImage."""
    return inputmodes.to_render_mode(_open(data)).convert("RGB").convert("L")


def _dpi_pair(dpi: float | Sequence[float] | None) -> tuple[float, float] | None:
    if dpi is None:
        return None
    pair = (dpi, dpi) if isinstance(dpi, (int, float)) else tuple(dpi)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= MAX_DPI
                                 for v in pair):
        raise ValueError(f"dpi must be a number or an (x, y) pair in (0, {MAX_DPI}], got {dpi!r}")
    return (float(pair[0]), float(pair[1]))


def encode_output(image: Image.Image, fmt: OutputFormat, quality: int | None = None,
                  dpi: float | Sequence[float] | None = None) -> bytes:
    """Encode ``image`` as ``fmt`` (see the module doc for alpha, ``dpi`` and ``quality``).

    ``image`` is RGB or RGBA (other modes are converted: to RGBA if they have alpha).
    ``quality`` (1..100) applies to JPEG and WebP and defaults to 95; ``dpi`` is a number or
    an ``(x, y)`` pair of dots per inch, in ``(0, MAX_DPI]``, or None for none written.

    Raises:
        ValueError: ``quality`` or ``dpi`` out of range.
    """
    if quality is None:
        quality = DEFAULT_QUALITY
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in [1, 100], got {quality!r}")
    dpi_pair = _dpi_pair(dpi)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    buf = io.BytesIO()
    if fmt is OutputFormat.PNG:
        options: dict[str, object] = {} if dpi_pair is None else {"dpi": dpi_pair}
        image.save(buf, format="PNG", **options)
    elif fmt is OutputFormat.JPEG:
        if image.mode == "RGBA":
            flat = Image.new("RGB", image.size, (255, 255, 255))
            flat.paste(image, mask=image.getchannel("A"))
            image = flat
        options = {} if dpi_pair is None else {"dpi": tuple(round(v) for v in dpi_pair)}
        image.save(buf, format="JPEG", quality=quality, **options)
    else:
        options = {}
        if dpi_pair is not None:
            exif = Image.Exif()
            exif[_EXIF_X_RESOLUTION] = dpi_pair[0]
            exif[_EXIF_Y_RESOLUTION] = dpi_pair[1]
            exif[_EXIF_RESOLUTION_UNIT] = _EXIF_INCH
            options["exif"] = exif.tobytes()
        image.save(buf, format=_PIL_FORMATS[fmt], quality=quality, **options)
    return buf.getvalue()


def encode(image: Image.Image, fmt: OutputFormat, quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode ``image`` as ``fmt``; the same image always gives the same bytes. An RGB image
    gives the same bytes as before ``encode_output`` existed; see it for alpha and DPI."""
    return encode_output(image, fmt, quality)
