"""The API reports and checks input sizes as the image is shown: EXIF Orientation applied (issue 16.2)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from api.errors import ApiError
from api.images import inspect_image
from api.intake import check_images
from api.settings import ApiSettings
from broker.schema import JobParams


def _jpeg(size: tuple[int, int], orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 90, 160)).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 255).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("orientation", "size"), [
    (None, (128, 64)), (1, (128, 64)), (2, (128, 64)), (3, (128, 64)), (4, (128, 64)),
    (5, (64, 128)), (6, (64, 128)), (7, (64, 128)), (8, (64, 128)),
])
def test_inspect_image_reports_the_upright_size(orientation: int | None, size: tuple[int, int]) -> None:
    image = inspect_image(_jpeg((128, 64), orientation), ApiSettings())
    assert (image.width, image.height) == size


def test_a_mask_drawn_on_the_shown_portrait_photo_matches_it() -> None:
    settings = ApiSettings()
    photo = inspect_image(_jpeg((128, 64), 6), settings)  # stored landscape, shown portrait
    params = JobParams(operation="inpaint", prompt="p", seed=1)

    check_images(params, photo, inspect_image(_png((64, 128)), settings))  # the shown size: accepted
    with pytest.raises(ApiError) as refused:
        check_images(params, photo, inspect_image(_png((128, 64)), settings))
    assert refused.value.param == "mask"
