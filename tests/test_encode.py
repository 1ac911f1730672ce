"""Output encoding (format, quality, DPI, alpha) and input decoding at the worker's edges."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from broker.schema import OutputFormat
from workers.encode import UnreadableImage, decode_image, decode_mask, decode_rgb, encode, encode_output


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def old_encode(image: Image.Image, fmt: OutputFormat, quality: int = 95) -> bytes:
    """``encode`` as it was before DPI and alpha support."""
    buf = io.BytesIO()
    if fmt is OutputFormat.PNG:
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format={"jpeg": "JPEG", "webp": "WEBP"}[fmt.value], quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_encode_gives_the_same_bytes_as_before_for_rgb_images(fmt: OutputFormat) -> None:
    image = noise(40, 30)
    assert encode(image, fmt) == old_encode(image, fmt)
    assert encode(image, fmt, 70) == old_encode(image, fmt, 70) == encode_output(image, fmt, 70)


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_the_same_image_and_options_always_give_the_same_bytes(fmt: OutputFormat) -> None:
    image = noise(40, 30, "RGBA")
    assert encode_output(image, fmt, 80, dpi=300) == encode_output(image.copy(), fmt, 80, dpi=300)


@pytest.mark.parametrize(("fmt", "mime"), [(OutputFormat.PNG, "PNG"), (OutputFormat.JPEG, "JPEG"),
                                           (OutputFormat.WEBP, "WEBP")])
def test_each_format_writes_its_own_kind_of_file(fmt: OutputFormat, mime: str) -> None:
    assert reopen(encode_output(noise(16, 16), fmt)).format == mime


def test_png_and_jpeg_carry_the_dpi_in_their_header() -> None:
    png = reopen(encode_output(noise(16, 16), OutputFormat.PNG, dpi=300))
    assert tuple(round(v) for v in png.info["dpi"]) == (300, 300)  # pHYs is px per metre
    jpeg = reopen(encode_output(noise(16, 16), OutputFormat.JPEG, dpi=(300, 150)))
    assert jpeg.info["dpi"] == (300, 150)  # JFIF density
    assert "dpi" not in reopen(encode_output(noise(16, 16), OutputFormat.PNG)).info


def test_webp_carries_the_dpi_as_exif_resolution_in_inches() -> None:
    webp = reopen(encode_output(noise(16, 16), OutputFormat.WEBP, dpi=72))
    exif = webp.getexif()
    assert (float(exif[282]), float(exif[283]), exif[296]) == (72.0, 72.0, 2)


def test_png_and_webp_keep_an_alpha_channel_and_jpeg_flattens_it_onto_white() -> None:
    rgba = noise(20, 10, "RGBA")
    png = reopen(encode_output(rgba, OutputFormat.PNG))
    assert png.mode == "RGBA" and np.array_equal(np.asarray(png), np.asarray(rgba))
    webp = reopen(encode_output(rgba, OutputFormat.WEBP, quality=100))
    assert webp.mode == "RGBA"
    assert np.abs(np.asarray(webp)[:, :, 3].astype(int) - np.asarray(rgba)[:, :, 3]).max() <= 2
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    jpeg = reopen(encode_output(clear, OutputFormat.JPEG))
    assert jpeg.mode == "RGB" and np.asarray(jpeg).min() >= 250


def test_quality_changes_lossy_formats_and_bad_values_are_refused() -> None:
    image = noise(64, 64)
    assert len(encode_output(image, OutputFormat.JPEG, 20)) < len(encode_output(image, OutputFormat.JPEG, 95))
    for bad in (0, 101, 50.5):
        with pytest.raises(ValueError, match="quality"):
            encode_output(image, OutputFormat.JPEG, bad)  # type: ignore[arg-type]
    for bad_dpi in (0, -1, 10**6, (1, 2, 3), float("nan")):
        with pytest.raises(ValueError, match="dpi"):
            encode_output(image, OutputFormat.PNG, dpi=bad_dpi)  # type: ignore[arg-type]


def test_decode_image_keeps_alpha_when_there_is_some() -> None:
    rgba = noise(8, 8, "RGBA")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).mode == "RGBA"
    assert decode_rgb(buf.getvalue()).mode == "RGB"
    buf = io.BytesIO()
    noise(8, 8).save(buf, format="JPEG")
    assert decode_image(buf.getvalue()).mode == "RGB"
    paletted = Image.new("P", (8, 8), 0)
    paletted.info["transparency"] = 0
    buf = io.BytesIO()
    paletted.save(buf, format="PNG", transparency=0)
    decoded = decode_image(buf.getvalue())
    assert decoded.mode == "RGBA" and (np.asarray(decoded)[:, :, 3] == 0).all()


def test_decode_mask_gives_luminance() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 255, 255)).save(buf, format="PNG")
    mask = decode_mask(buf.getvalue())
    assert mask.mode == "L" and (np.asarray(mask) == 255).all()
    with pytest.raises(UnreadableImage):
        decode_mask(b"not an image")
