"""Input decoding on the worker (issue 16.2, 16.3): EXIF orientation and every image mode Pillow opens.

Real Pillow images, written to PNG/JPEG/WebP bytes and decoded by the worker's own path
(``workers.encode.decode_image`` / ``decode_mask``, and ``workers.jobio.render_request`` which
the runner calls), with pixel values checked per mode and per orientation.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from broker.schema import Job, JobParams, new_job_id
from storage.store import InMemoryObjectStore
from workers.encode import decode_image, decode_mask, decode_rgb
from workers.inputmodes import to_render_mode
from workers.jobio import render_request
from workers.loras import LoraResolver

ORIENTATION_TAG = 0x0112
BLOCK = 32  # px: JPEG's 8x8 blocks and 2x2 chroma subsampling stay inside one colour


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    options: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        options["quality"] = 95
    return _encode(image, fmt, **options)


def _blocks(rows: int, cols: int) -> np.ndarray:
    """An RGB array of ``rows`` x ``cols`` blocks (BLOCK px each), every block its own colour."""
    rng = np.random.default_rng(5)
    colours = rng.integers(0, 256, size=(rows, cols, 3)).astype(np.uint8)
    return np.kron(colours, np.ones((BLOCK, BLOCK, 1), dtype=np.uint8))


# How a viewer shows stored pixels, per the EXIF specification's Orientation values (written
# with numpy, independently of Pillow's transpose table): 1 as stored, 2 mirrored, 3 turned
# 180°, 4 flipped, 5 transposed, 6 turned 90° clockwise, 7 transverse, 8 turned 90° anticlockwise.
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


def _block_centres(array: np.ndarray) -> np.ndarray:
    return array[BLOCK // 2::BLOCK, BLOCK // 2::BLOCK].astype(int)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_is_decoded_as_its_exif_orientation_shows_it(orientation: int) -> None:
    stored = _blocks(2, 4)  # 128 x 64 as stored, like a phone's sensor readout
    data = _with_orientation(Image.fromarray(stored, "RGB"), orientation)
    expected = DISPLAY[orientation](stored)

    decoded = decode_image(data)

    assert decoded.mode == "RGB"
    assert decoded.size == (expected.shape[1], expected.shape[0])
    if orientation in (5, 6, 7, 8):
        assert decoded.size == (64, 128)  # portrait
    assert np.abs(_block_centres(np.asarray(decoded)) - _block_centres(expected)).max() <= 8
    assert decoded.getexif().get(ORIENTATION_TAG) in (None, 1)  # applied once, not again downstream


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_mask_and_a_reference_follow_their_orientation_too(orientation: int) -> None:
    grey = _blocks(2, 4)[:, :, 0]
    mask_data = _with_orientation(Image.fromarray(grey, "L"), orientation)
    ref_data = _with_orientation(Image.fromarray(_blocks(2, 4), "RGB"), orientation, fmt="PNG")

    mask = decode_mask(mask_data)
    reference = decode_rgb(ref_data)

    expected_grey = DISPLAY[orientation](grey)
    assert mask.mode == "L" and mask.size == (expected_grey.shape[1], expected_grey.shape[0])
    assert np.abs(_block_centres(np.asarray(mask)) - _block_centres(expected_grey)).max() <= 8
    assert np.array_equal(np.asarray(reference), DISPLAY[orientation](_blocks(2, 4)))  # PNG: exact


def test_the_runner_builds_its_request_from_upright_inputs() -> None:
    objects = InMemoryObjectStore()
    stored = _blocks(2, 4)
    objects.put("in/image.jpg", _with_orientation(Image.fromarray(stored, "RGB"), 6), "image/jpeg")
    objects.put("in/ref.jpg", _with_orientation(Image.fromarray(stored, "RGB"), 8), "image/jpeg")
    objects.put("in/mask.png", _with_orientation(Image.fromarray(stored[:, :, 0], "L"), 6, "PNG"), "image/png")
    resolver = LoraResolver(objects=objects, bucket="editfarm")
    edit = Job(id=new_job_id(), tenant="acme", input_keys=["in/image.jpg", "in/ref.jpg"],
               params=JobParams(operation="edit", prompt="p", seed=1))
    inpaint = Job(id=new_job_id(), tenant="acme", input_keys=["in/image.jpg"], mask_key="in/mask.png",
                  params=JobParams(operation="inpaint", prompt="p", seed=1))

    edit_request = render_request(edit, objects, resolver)
    inpaint_request = render_request(inpaint, objects, resolver)

    assert [image.size for image in edit_request.images] == [(64, 128), (64, 128)]
    assert inpaint_request.images[0].size == (64, 128)
    assert inpaint_request.mask is not None and inpaint_request.mask.size == (64, 128)
    assert np.array_equal(np.asarray(inpaint_request.mask), np.rot90(stored[:, :, 0], k=-1))


def test_a_broken_exif_block_leaves_the_image_as_stored() -> None:
    image = Image.fromarray(_blocks(2, 4), "RGB")
    data = _encode(image, "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\xff")
    assert decode_image(data).size == (128, 64)


# -- modes -------------------------------------------------------------------------------------


def _grey16(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8), value, dtype=np.uint16))


def test_sixteen_bit_grey_png_is_scaled_not_clipped() -> None:
    data = _encode(_grey16(40000), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    decoded = decode_image(data)

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 65535 * 255 = 155.6
    assert decode_mask(data).getpixel((0, 0)) == 156


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (128, 0), (129, 1), (257, 1), (32768, 128),
                                                  (65535, 255)])
def test_sixteen_bit_grey_scales_across_its_whole_range(value: int, expected: int) -> None:
    assert decode_image(_encode(_grey16(value), "PNG")).getpixel((3, 3)) == (expected,) * 3


def test_a_sixteen_bit_grey_png_with_a_transparent_value_gets_alpha() -> None:
    array = np.full((4, 4), 40000, dtype=np.uint16)
    array[0, 0] = 1234
    data = _encode(Image.fromarray(array), "PNG", transparency=1234)

    decoded = decode_image(data)

    assert decoded.mode == "RGBA"
    assert decoded.getpixel((0, 0))[3] == 0 and decoded.getpixel((1, 1)) == (156, 156, 156, 255)


def _bilevel() -> Image.Image:
    image = Image.new("1", (8, 8), 0)
    image.putpixel((1, 1), 1)
    return image


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0, 0, 0] * 254)
    image.putpixel((1, 1), 1)
    if transparent:
        image.info["transparency"] = 0
    return image


def _cmyk() -> Image.Image:
    return Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # full magenta and yellow ink: red


# (name, image, format, expected mode, pixel at (1, 1), pixel at (0, 0), tolerance)
ROUND_TRIPS = [
    ("1 as PNG", _bilevel(), "PNG", "RGB", (255, 255, 255), (0, 0, 0), 0),
    ("L as PNG", Image.new("L", (8, 8), 77), "PNG", "RGB", (77, 77, 77), (77, 77, 77), 0),
    ("L as JPEG", Image.new("L", (16, 16), 77), "JPEG", "RGB", (77, 77, 77), (77, 77, 77), 2),
    ("L as WebP", Image.new("L", (16, 16), 77), "WEBP", "RGB", (77, 77, 77), (77, 77, 77), 3),
    ("LA as PNG", Image.new("LA", (8, 8), (90, 40)), "PNG", "RGBA", (90, 90, 90, 40), (90, 90, 90, 40), 0),
    ("LA as WebP", Image.new("LA", (16, 16), (90, 40)), "WEBP", "RGBA", (90, 90, 90, 40), (90, 90, 90, 40), 3),
    ("P as PNG", _palette(False), "PNG", "RGB", (200, 100, 50), (10, 20, 30), 0),
    ("P+transparency as PNG", _palette(True), "PNG", "RGBA", (200, 100, 50, 255), (10, 20, 30, 0), 0),
    ("I;16 as PNG", _grey16(40000), "PNG", "RGB", (156, 156, 156), (156, 156, 156), 0),
    ("I;16B as PNG", Image.new("I;16B", (8, 8), 40000), "PNG", "RGB", (156, 156, 156), (156, 156, 156), 0),
    ("RGB as PNG", Image.new("RGB", (8, 8), (1, 2, 3)), "PNG", "RGB", (1, 2, 3), (1, 2, 3), 0),
    ("RGB as JPEG", Image.new("RGB", (16, 16), (200, 30, 60)), "JPEG", "RGB", (200, 30, 60), (200, 30, 60), 4),
    ("RGBA as PNG", Image.new("RGBA", (8, 8), (1, 2, 3, 4)), "PNG", "RGBA", (1, 2, 3, 4), (1, 2, 3, 4), 0),
    ("RGBA as WebP", Image.new("RGBA", (16, 16), (200, 30, 60, 128)), "WEBP", "RGBA", (200, 30, 60, 128),
     (200, 30, 60, 128), 4),
    ("CMYK as JPEG", _cmyk(), "JPEG", "RGB", (255, 0, 0), (255, 0, 0), 3),
]


@pytest.mark.parametrize(("image", "fmt", "mode", "at_1_1", "at_0_0", "tolerance"),
                         [row[1:] for row in ROUND_TRIPS], ids=[row[0] for row in ROUND_TRIPS])
def test_each_mode_round_trips_through_its_format_with_the_right_pixels(
        image: Image.Image, fmt: str, mode: str, at_1_1: tuple[int, ...], at_0_0: tuple[int, ...],
        tolerance: int) -> None:
    options = {"lossless": True} if fmt == "WEBP" and image.mode in ("LA", "L") else {}
    data = _encode(image, fmt, **options)

    decoded = decode_image(data)

    assert decoded.mode == mode
    for where, expected in (((1, 1), at_1_1), ((0, 0), at_0_0)):
        got = decoded.getpixel(where)
        assert all(abs(g - e) <= tolerance for g, e in zip(got, expected, strict=True)), (where, got, expected)


# Modes Pillow builds in memory (or older Pillows open from PNG) but that today's encoders
# cannot write: converted directly.
IN_MEMORY = [
    ("PA", Image.new("PA", (4, 4), (0, 99)), "RGBA", None),
    ("I (16-bit values)", Image.new("I", (4, 4), 40000), "RGB", (156, 156, 156)),
    ("I clipped below", Image.new("I", (4, 4), -5), "RGB", (0, 0, 0)),
    ("I clipped above", Image.new("I", (4, 4), 100000), "RGB", (255, 255, 255)),
    ("I;16L", Image.new("I;16L", (4, 4), 32768), "RGB", (128, 128, 128)),
    ("F", Image.new("F", (4, 4), 155.6), "RGB", (156, 156, 156)),
    ("F clipped", Image.new("F", (4, 4), 300.0), "RGB", (255, 255, 255)),
    ("YCbCr", Image.new("RGB", (4, 4), (200, 30, 60)).convert("YCbCr"), "RGB", (200, 30, 60)),
]


@pytest.mark.parametrize(("image", "mode", "pixel"), [row[1:] for row in IN_MEMORY],
                         ids=[row[0] for row in IN_MEMORY])
def test_in_memory_modes_convert_to_the_render_mode(image: Image.Image, mode: str,
                                                    pixel: tuple[int, ...] | None) -> None:
    converted = to_render_mode(image)
    assert converted.mode == mode
    if pixel is None:  # PA: the palette's first entry (black) with its alpha
        assert converted.getpixel((0, 0)) == (0, 0, 0, 99)
    else:
        assert all(abs(g - e) <= 2 for g, e in zip(converted.getpixel((2, 2)), pixel, strict=True))
