"""Input-image intake: get the bytes (data URL, upload or URL), then prove they are a sane image.

Validation order, cheapest first, so hostile inputs cost little:

1. byte cap (``max_image_bytes``) → 413 ``payload_too_large``;
2. header only (``Image.open`` reads no pixels): not an image → 422
   ``invalid_image``; not PNG/JPEG/WEBP → 422 ``unsupported_image_format``;
3. dimensions from the header: ``width*height > max_image_pixels`` or a side
   over ``max_image_side_px`` → 422 ``image_too_large`` (422, not 413: the
   request was within the byte limit; it is the image's content that is refused);
4. integrity → 422 ``invalid_image`` for truncated/corrupt data: a PNG by Pillow's ``verify()``
   (every chunk read to ``IEND`` and its CRC checked, no pixel decoded: ~1 ms for a 2 MB
   1024² PNG, where a full decode took ~19 ms, the largest CPU cost of an edit submission);
   JPEG and WebP, which have no such check, by a full decode (``img.load()``).

A PNG whose chunks are intact but whose compressed pixel data is not (possible only for a file
made that way on purpose) passes here and is refused by the worker's full decode before any
render: the job fails with ``input_unreadable`` (``workers/jobio.py``).

The reported ``width``/``height`` are the upright ones (EXIF Orientation applied, as the workers
decode inputs), so a mask is compared with the image as it is shown.

The original bytes are kept (not re-encoded) and go to the object store, never Redis.
"""

from __future__ import annotations

import binascii
import io
from dataclasses import dataclass

import anyio
from PIL import Image, UnidentifiedImageError

from api.errors import ApiError
from api.fetch import fetch_image_bytes
from api.settings import ApiSettings
from broker.schema import ErrorCode

# Pillow format name → (object-key extension, content type). MPO is what Pillow calls
# multi-picture JPEGs (many phone cameras); it is a JPEG file and decodes as one.
FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "MPO": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
}
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP")
# A full decode of a 40 MP image holds ~160 MB; bound how many run at once per process
# so a burst of large uploads cannot exhaust the API's memory.
DECODE_LIMITER = anyio.CapacityLimiter(4)


@dataclass(frozen=True)
class InputImage:
    """A validated input image: its original bytes and what they are."""

    data: bytes
    ext: str  # object-key extension: png | jpg | webp
    content_type: str
    width: int  # px
    height: int  # px


def _too_big(limit: int) -> ApiError:
    return ApiError(413, ErrorCode.PAYLOAD_TOO_LARGE, f"image is larger than {limit} bytes", param="image")


def _invalid(message: str) -> ApiError:
    return ApiError(422, ErrorCode.INVALID_IMAGE, message, param="image")


def inspect_image(data: bytes, settings: ApiSettings) -> InputImage:
    """Validate ``data`` as described in the module docstring (CPU-bound: call in a thread).

    Raises ApiError 413 payload_too_large, 422 invalid_image,
    unsupported_image_format or image_too_large.
    """
    if len(data) > settings.max_image_bytes:
        raise _too_big(settings.max_image_bytes)
    if not data:
        raise _invalid("image is empty")
    try:
        # formats= keeps the exotic Pillow decoders away from untrusted bytes
        img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own guard (≥ 2× Image.MAX_IMAGE_PIXELS) fired while reading the header
        raise ApiError(422, ErrorCode.IMAGE_TOO_LARGE, "image dimensions are too large", param="image") from None
    except UnidentifiedImageError:
        raise _classify_unidentified(data) from None
    except Exception:  # noqa: BLE001 - Pillow raises many types on malformed headers
        raise _invalid("image header could not be read") from None
    with img:
        fmt = FORMATS.get(img.format or "")
        if fmt is None:
            raise ApiError(422, ErrorCode.UNSUPPORTED_IMAGE_FORMAT,
                           f"image format {img.format} is not supported; use PNG, JPEG or WEBP", param="image")
        width, height = img.size
        if (width * height > settings.max_image_pixels
                or max(width, height) > settings.max_image_side_px):
            raise ApiError(
                422, ErrorCode.IMAGE_TOO_LARGE,
                f"image is {width}x{height} px; the limit is {settings.max_image_pixels} px in all "
                f"and {settings.max_image_side_px} px per side", param="image",
            )
        if width < 1 or height < 1:
            raise _invalid("image has no pixels")
        try:
            if img.format == "PNG":
                img.verify()  # chunk CRCs up to IEND (a truncated file has none); the pixels stay compressed
            else:
                img.load()
        except Exception:  # noqa: BLE001 - truncated data raises OSError, bad streams SyntaxError/ValueError
            raise _invalid("image data is truncated or corrupt") from None
        width, height = upright_size(img, width, height)
        return InputImage(data=data, ext=fmt[0], content_type=fmt[1], width=width, height=height)


# EXIF Orientation values that turn the image a quarter (transpose, 90°, transverse, 270°)
_QUARTER_TURNS = frozenset({5, 6, 7, 8})


def upright_size(img: Image.Image, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` as the image is shown, its EXIF Orientation applied (the workers decode
    it upright): swapped for the quarter turns. An unreadable EXIF block changes nothing."""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - Pillow raises many types for a broken EXIF block
        return width, height
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def _classify_unidentified(data: bytes) -> ApiError:
    """Not PNG/JPEG/WEBP: is it another image format (say so) or not an image at all?

    Only the header is parsed here, never pixels.
    """
    try:
        with Image.open(io.BytesIO(data)) as other:
            name = other.format or "unknown"
    except Exception:  # noqa: BLE001 - any failure means "not an image we recognise"
        return _invalid("data is not a PNG, JPEG or WEBP image")
    return ApiError(422, ErrorCode.UNSUPPORTED_IMAGE_FORMAT,
                    f"image format {name} is not supported; use PNG, JPEG or WEBP", param="image")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URL (base64 only).

    The declared media type is ignored: Pillow decides what the bytes are.
    Raises ApiError 422 invalid_parameter (not base64 data URL), 422
    invalid_image (bad base64) or 413 payload_too_large (decoded size > max_bytes).
    """
    comma = url.find(",")
    if comma < 0 or not url[:comma].lower().endswith(";base64"):
        raise ApiError(422, ErrorCode.INVALID_PARAMETER,
                       "image data URL must be 'data:image/<type>;base64,<data>'", param="image")
    # each copy of a 4 MB data URL is 4 MB per concurrent upload: one slice, no more
    payload = url[comma + 1:]
    # unwrapped base64 (what nearly every client sends) is decoded as it is: looking for whitespace
    # first cost a scan of the whole string, which took longer than the decode itself
    data = _strict_b64(payload) if _decoded_size(payload) <= max_bytes + 3 else None
    if data is None:
        unwrapped = "".join(payload.split())  # clients often wrap base64 at 76 columns
        if _decoded_size(unwrapped) > max_bytes + 3:  # refuse before allocating the decoded copy
            raise _too_big(max_bytes)
        data = _strict_b64(unwrapped) if len(unwrapped) != len(payload) else None
        if data is None:
            raise _invalid("image data URL is not valid base64")
    del payload
    if len(data) > max_bytes:
        raise _too_big(max_bytes)
    return data


def _decoded_size(payload: str) -> int:
    return len(payload) // 4 * 3


def _strict_b64(payload: str) -> bytes | None:
    """The bytes of strict base64 ``payload`` (only the alphabet and final padding, as
    ``b64decode(validate=True)``), or None if it is not: whitespace and non-ASCII included."""
    try:
        # an ASCII str is read in place instead of being encoded to a bytes copy first
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        return None


async def intake_image(source: str | bytes, settings: ApiSettings, param: str = "image",
                       label: str | None = None) -> InputImage:
    """Resolve an image given as upload bytes, a data URL or an http(s) URL, and validate it.

    ``param`` is what errors name (``image``, ``images``, ``mask``); ``label`` is how their
    messages call it (default ``param``; e.g. ``"reference image 2"``).

    Raises ApiError (see :func:`inspect_image`, :func:`decode_data_url` and
    :func:`api.fetch.fetch_image_bytes`); a string that is neither a data URL
    nor a URL → 422 invalid_parameter.
    """
    try:
        if isinstance(source, bytes):
            data = source
        elif source[:5].lower() == "data:":
            data = decode_data_url(source, settings.max_image_bytes)
        elif "://" in source:
            data = await fetch_image_bytes(source, settings)
        else:
            raise ApiError(422, ErrorCode.INVALID_PARAMETER,
                           "image must be a data: URL, an https:// URL or an uploaded file", param="image")
        return await anyio.to_thread.run_sync(inspect_image, data, settings, limiter=DECODE_LIMITER)
    except ApiError as exc:
        if param != "image" and exc.param == "image":
            raise _renamed(exc, param, label or param) from None
        raise


def _renamed(exc: ApiError, param: str, label: str) -> ApiError:
    """``exc`` (raised about "image") about ``param`` instead, its message naming ``label``."""
    message = exc.message
    if message.startswith("image "):
        message = f"{label} {message[len('image '):]}"
    elif message.startswith("data is not"):
        message = f"{label}: {message}"
    message = message.replace("the image URL", f"the {label} URL")
    return ApiError(exc.status_code, exc.code, message, param=param, headers=exc.headers)
