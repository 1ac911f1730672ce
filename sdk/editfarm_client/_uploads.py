"""Turning what a caller passes as an image into request parts.

An image argument may be:

- a URL string: ``https://…`` (or ``http://…`` where the server allows it) or a ``data:`` URL,
  sent as-is for the server to fetch or decode;
- a local file: a ``str`` path or an ``os.PathLike`` (``pathlib.Path``);
- raw encoded bytes (``bytes``, ``bytearray``, ``memoryview``) of a PNG, JPEG or WebP;
- a binary file object (anything with ``.read()`` returning bytes);
- a PIL image (saved as PNG; Pillow is never imported by this package, the object's own
  ``save`` is used).
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from typing import IO, Any, Union

#: What the ``image``/``mask``/``images`` parameters accept (see the module docstring).
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Any]

_URL_PREFIXES = ("https://", "http://", "data:")


@dataclass(frozen=True)
class Upload:
    """Image bytes to send, with a file name and a content type."""

    filename: str
    data: bytes
    content_type: str

    def data_url(self) -> str:
        return f"data:{self.content_type};base64,{base64.b64encode(self.data).decode()}"


def sniff_content_type(data: bytes) -> str:
    """The image media type from magic bytes; ``application/octet-stream`` when unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"


def _default_name(stem: str, content_type: str) -> str:
    ext = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}
    return stem + ext.get(content_type, "")


def _is_pil_image(value: Any) -> bool:
    module = type(value).__module__ or ""
    return module.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "mode")


def to_upload(value: ImageInput, stem: str = "image") -> str | Upload:
    """A URL string to send as-is, or an :class:`Upload` of local bytes.

    Raises FileNotFoundError for a path that does not exist and TypeError for an unsupported value.
    """
    if isinstance(value, str) and value.startswith(_URL_PREFIXES):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        with open(path, "rb") as fh:
            data = fh.read()
        return Upload(os.path.basename(path) or _default_name(stem, sniff_content_type(data)), data,
                      sniff_content_type(data))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        content_type = sniff_content_type(data)
        return Upload(_default_name(stem, content_type), data, content_type)
    if _is_pil_image(value):
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # type: ignore[union-attr]
        return Upload(f"{stem}.png", buf.getvalue(), "image/png")
    read = getattr(value, "read", None)
    if callable(read):
        data = read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{stem}: the file object must be opened in binary mode")
        data = bytes(data)
        name = getattr(value, "name", None)
        content_type = sniff_content_type(data)
        filename = os.path.basename(name) if isinstance(name, str) and name else _default_name(stem, content_type)
        return Upload(filename, data, content_type)
    raise TypeError(f"{stem}: expected a URL, a file path, bytes, a binary file object or a PIL image, "
                    f"not {type(value).__name__}")
