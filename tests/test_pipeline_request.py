"""``RenderRequest`` and its specs: which fields apply to which operation, and their ranges."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from workers.pipeline.base import (
    OPERATIONS,
    MoveSpec,
    OutpaintSpec,
    RenderRequest,
    UpscaleSpec,
)

IMAGE = Image.new("RGB", (64, 48), "grey")
VALID: dict[str, dict[str, Any]] = {
    "edit": {},
    "generate": {"images": []},
    "inpaint": {"boxes": [(0.1, 0.1, 0.5, 0.5)]},
    "outpaint": {"outpaint": OutpaintSpec(left=16)},
    "move": {"move": MoveSpec(box=(0.1, 0.1, 0.5, 0.5), dx=10)},
    "upscale": {},
}


def make(operation: str, **fields: Any) -> RenderRequest:
    base: dict[str, Any] = {"operation": operation, "prompt": "p", "negative_prompt": None, "steps": 2,
                            "true_cfg_scale": 1.0, "seed": 0, "images": [IMAGE], **VALID[operation]}
    base.update(fields)
    return RenderRequest(**base)


def test_every_operation_has_a_valid_minimal_request() -> None:
    assert set(VALID) == set(OPERATIONS)
    for operation in OPERATIONS:
        request = make(operation)
        assert request.num_images == 1 and request.loras == [] and request.strength is None


def test_the_old_positional_edit_request_still_builds() -> None:
    request = RenderRequest("edit", "p", None, 2, 4.0, 7, [IMAGE])
    assert request.images == [IMAGE] and request.width is None and request.mask is None


@pytest.mark.parametrize(
    ("operation", "fields", "message"),
    [
        ("edit", {"images": []}, "one image plus up to 3"),
        ("edit", {"images": [IMAGE] * 5}, "one image plus up to 3"),
        ("edit", {"prompt": ""}, "needs a prompt"),
        ("generate", {"images": [IMAGE]}, "no input image"),
        ("inpaint", {"images": [IMAGE, IMAGE]}, "exactly one"),
        ("inpaint", {"boxes": []}, "mask or boxes"),
        ("inpaint", {"boxes": [(0.5, 0.1, 0.4, 0.9)]}, "x0 < x1"),
        ("inpaint", {"boxes": [(0, 0, 1.5, 1)]}, "x0 < x1"),
        ("inpaint", {"boxes": [(0, 0, 1)]}, "4 numbers"),
        ("inpaint", {"boxes": [(0, 0, 1, 1)] * 17}, "at most 16"),
        ("inpaint", {"width": 64}, "input's size"),
        ("outpaint", {"outpaint": None}, "needs its outpaint"),
        ("move", {"move": None}, "needs its move"),
        ("edit", {"mask": IMAGE}, "mask does not apply"),
        ("upscale", {"boxes": [(0, 0, 1, 1)]}, "boxes do not apply"),
        ("edit", {"outpaint": OutpaintSpec(left=1)}, "outpaint does not apply"),
        ("inpaint", {"upscale": UpscaleSpec()}, "upscale does not apply"),
        ("edit", {"strength": 0.5}, "strength does not apply"),
        ("inpaint", {"strength": 0.0}, "strength must be"),
        ("inpaint", {"strength": 1.5}, "strength must be"),
        ("edit", {"width": 1040}, "multiple of 16"),
        ("edit", {"width": 100}, "multiple of 16"),
        ("generate", {"height": 0}, "multiple of 16"),
        ("upscale", {"width": 2064}, "multiple of 16"),
        ("edit", {"num_images": 0}, "num_images"),
        ("edit", {"num_images": 5}, "num_images"),
        ("edit", {"steps": 0}, "steps"),
        ("edit", {"seed": 2**64}, "seed"),
        ("edit", {"true_cfg_scale": -1}, "true_cfg_scale"),
        ("edit", {"loras": [("a", 1.0)] * 5}, "at most 4"),
        ("edit", {"loras": [("a",)]}, "LoRA is a"),
        ("edit", {"loras": [("a", float("inf"))]}, "LoRA is a"),
        ("paint", {}, "unknown operation"),
    ],
)
def test_out_of_range_or_inapplicable_fields_are_refused(operation: str, fields: dict[str, Any], message: str) -> None:
    base = dict(VALID.get(operation, {}))
    with pytest.raises(ValueError, match=message):
        RenderRequest(**{"operation": operation, "prompt": "p", "negative_prompt": None, "steps": 2,
                         "true_cfg_scale": 1.0, "seed": 0, "images": [IMAGE], **base, **fields})


def test_the_largest_sizes_are_accepted() -> None:
    assert make("generate", width=1024, height=1024).width == 1024
    assert make("upscale", width=2048, height=2048).height == 2048
    assert make("edit", width=16, height=16).width == 16


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "margin > 0 or a target"),
        ({"left": -1}, ">= 0"),
        ({"left": 5, "width": 100}, "not both"),
        ({"width": 100, "direction": "up"}, "direction"),
        ({"width": 5000}, "width"),
        ({"right": 5000}, "at most"),
    ],
)
def test_outpaint_specs_are_margins_or_a_target(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OutpaintSpec(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"box": (0.5, 0.5, 0.2, 0.9)}, "x0 < x1"),
        ({"scale": 0.01}, "scale"),
        ({"scale": 5}, "scale"),
        ({"dx": 1.5}, "integer"),
        ({"seam": 300}, "seam"),
    ],
)
def test_move_specs_are_range_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoveSpec(**{"box": (0.1, 0.1, 0.5, 0.5), **fields})


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"tile": 16}, ">= 32"), ({"tile": 1040}, "multiple of 16"), ({"tile": 128, "overlap": 64}, "overlap"),
     ({"scale": 0}, "scale"), ({"overlap": -1}, "overlap")],
)
def test_upscale_specs_are_range_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UpscaleSpec(**fields)


def test_loras_given_as_lists_become_path_scale_tuples() -> None:
    assert make("edit", loras=[["/a.safetensors", 1]]).loras == [("/a.safetensors", 1.0)]


def test_a_move_box_given_as_a_list_becomes_a_tuple_of_floats() -> None:
    assert MoveSpec(box=[0, 0, 1, 1]).box == (0.0, 0.0, 1.0, 1.0)  # type: ignore[arg-type]
