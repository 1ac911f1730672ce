"""Image encoding and decoding at the worker's edges (bytes ↔ PIL)."""

from __future__ import annotations

import io

from PIL import Image

from broker.schema import OutputFormat

_PIL_FORMATS = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}


class UnreadableImage(ValueError):
    """Stored input bytes are not a decodable image."""


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB image. Raises UnreadableImage."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        raise UnreadableImage(f"input is not a readable image: {type(exc).__name__}") from exc


def encode(image: Image.Image, fmt: OutputFormat, quality: int = 95) -> bytes:
    """Encode ``image`` as ``fmt``; the same image always gives the same bytes."""
    buf = io.BytesIO()
    if fmt is OutputFormat.PNG:
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()
