"""The render operations over a fake painter: sizes, exactness outside the mask, alpha,
progress and cancellation (fast; the real model path is in test_pipeline_operations.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers import geometry as g
from workers import operations as ops
from workers.operations import Sampling
from workers.pipeline.base import (
    InvalidRequest,
    MoveSpec,
    OutpaintSpec,
    RenderInterrupted,
    RenderRequest,
    UpscaleSpec,
)


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def colour(seed: int) -> tuple[int, int, int]:
    return (seed % 251, 17, 200)


class FakePainter:
    """Paints solid colours (one per seed) and runs ``steps`` (img2img/inpaint: the effective
    steps) fake steps through the callback; img2img returns its input unchanged."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.tiling: list[bool] = []
        self._tiled = False

    def _steps(self, total: int, on_step: Any) -> None:
        for step in range(1, total + 1):
            if on_step is not None and not on_step(step, total):
                raise RenderInterrupted(step, total)

    def edit(self, images: list[Image.Image], sampling: Sampling, size: tuple[int, int], on_step: Any) -> list[Image.Image]:
        self.calls.append(("edit", (len(images), size, sampling.seeds)))
        self._steps(sampling.steps, on_step)
        return [Image.new("RGB", size, colour(s)) for s in sampling.seeds]

    def generate(self, sampling: Sampling, size: tuple[int, int], on_step: Any) -> list[Image.Image]:
        self.calls.append(("generate", (size, sampling.seeds)))
        self._steps(sampling.steps, on_step)
        return [Image.new("RGB", size, colour(s)) for s in sampling.seeds]

    def inpaint(self, image: Image.Image, mask: Image.Image, sampling: Sampling, strength: float,
                on_step: Any) -> list[Image.Image]:
        assert image.width % 16 == 0 and image.height % 16 == 0 and mask.size == image.size
        self.calls.append(("inpaint", (image.size, strength, sampling.seeds)))
        self._steps(ops.effective_steps(sampling.steps, strength), on_step)
        return [Image.new("RGB", image.size, colour(s)) for s in sampling.seeds]

    def img2img(self, image: Image.Image, sampling: Sampling, strength: float, on_step: Any) -> list[Image.Image]:
        assert image.width % 16 == 0 and image.height % 16 == 0
        self.calls.append(("img2img", (image.size, strength, sampling.seeds)))
        self.tiling.append(self._tiled)
        self._steps(ops.effective_steps(sampling.steps, strength), on_step)
        return [image.copy() for _ in sampling.seeds]

    @contextlib.contextmanager
    def tiled_vae(self) -> Iterator[None]:
        self._tiled = True
        try:
            yield
        finally:
            self._tiled = False


def request(operation: str, image: Image.Image | None = None, **fields: Any) -> RenderRequest:
    base: dict[str, Any] = {
        "operation": operation, "prompt": "p", "negative_prompt": None, "steps": 4, "true_cfg_scale": 1.0,
        "seed": 5, "images": [] if image is None else [image],
    }
    base.update(fields)
    return RenderRequest(**base)


def recorder() -> tuple[list[tuple[int, int]], Any]:
    calls: list[tuple[int, int]] = []

    def on_step(done: int, total: int) -> bool:
        calls.append((done, total))
        return True

    return calls, on_step


# -- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "size"),
    [
        ({"operation": "edit"}, (1248, 832)),
        ({"operation": "edit", "width": 512, "height": 256}, (512, 256)),
        ({"operation": "edit", "width": 480}, (480, 320)),
        ({"operation": "edit", "height": 1024}, (1024, 1024)),  # 1536 capped at the native 1024
        ({"operation": "generate", "images": []}, (1024, 1024)),
        ({"operation": "generate", "images": [], "width": 640}, (640, 1024)),
        ({"operation": "inpaint", "boxes": [(0, 0, 0.5, 0.5)]}, (96, 64)),
        ({"operation": "move", "move": MoveSpec(box=(0, 0, 0.5, 0.5), dx=3)}, (96, 64)),
        ({"operation": "outpaint", "outpaint": OutpaintSpec(left=10, bottom=7)}, (106, 71)),
        ({"operation": "outpaint", "outpaint": OutpaintSpec(width=200, direction="right")}, (200, 64)),
        ({"operation": "upscale"}, (192, 128)),
        ({"operation": "upscale", "width": 2048, "height": 2048}, (2048, 2048)),
        ({"operation": "upscale", "width": 384}, (384, 256)),
        ({"operation": "upscale", "upscale": UpscaleSpec(scale=8)}, (768, 512)),
    ],
)
def test_output_size_follows_the_per_operation_rules(fields: dict[str, Any], size: tuple[int, int]) -> None:
    fields = {"images": [noise(96, 64)], **fields}
    assert ops.output_size(request(**fields)) == size


def test_every_operation_returns_num_images_of_the_announced_size() -> None:
    image = noise(100, 70, 1)
    cases = [
        request("edit", image, width=64, height=48),
        request("edit", None, images=[image, noise(30, 30), noise(20, 40)]),
        request("generate", width=128, height=64),
        request("inpaint", image, boxes=[(0.1, 0.1, 0.4, 0.4)]),
        request("outpaint", image, outpaint=OutpaintSpec(width=130, height=90, direction="top-left")),
        request("move", image, move=MoveSpec(box=(0.1, 0.1, 0.4, 0.5), dx=12, dy=-3, scale=0.85)),
        request("upscale", image, upscale=UpscaleSpec(tile=64, overlap=16)),
    ]
    for case in cases:
        case = RenderRequest(**{**case.__dict__, "num_images": 3})
        outputs = ops.run(FakePainter(), case)
        assert len(outputs) == 3
        assert all(o.size == ops.output_size(case) and o.mode == "RGB" for o in outputs), case.operation


def test_outputs_get_seeds_seed_plus_k() -> None:
    painter = FakePainter()
    ops.run(painter, request("generate", width=64, height=64, num_images=3, seed=2**64 - 2))
    assert painter.calls == [("generate", ((64, 64), (2**64 - 2, 2**64 - 1, 0)))]


def test_an_edit_with_references_hands_all_images_to_the_painter() -> None:
    painter = FakePainter()
    ops.run(painter, request("edit", None, images=[noise(96, 64), noise(20, 20), noise(40, 20)]))
    assert painter.calls[0] == ("edit", (3, (1248, 832), (5,)))


# -- inpaint, outpaint, move -------------------------------------------------------------------


@pytest.mark.parametrize("size", [(96, 64), (100, 70), (1500, 900)])
def test_inpaint_changes_only_the_masked_pixels(size: tuple[int, int]) -> None:
    image = noise(*size, seed=2)
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    painter = FakePainter()
    out = ops.run(painter, request("inpaint", image, mask=mask, boxes=[(0.8, 0.8, 0.9, 1.0)]))[0]
    union = (arr(mask) == 255) | (arr(g.mask_from_boxes(size, [(0.8, 0.8, 0.9, 1.0)])) == 255)
    assert out.size == size
    assert (arr(out)[~union] == arr(image)[~union]).all()
    assert (arr(out)[union] == colour(5)).all()
    work_size = painter.calls[0][1][0]
    assert work_size[0] * work_size[1] <= 1.05 * ops.MAX_WORK_PIXELS


def test_inpaint_of_a_large_image_renders_only_the_area_around_the_mask() -> None:
    image = noise(2400, 1800, 3)
    painter = FakePainter()
    out = ops.run(painter, request("inpaint", image, boxes=[(0.5, 0.5, 0.55, 0.55)]))[0]
    assert out.size == image.size
    assert painter.calls[0][1][0] == (256, 224)  # the 120 x 90 box plus 64 px of context per side
    rect = g.box_to_rect((0.5, 0.5, 0.55, 0.55), image.size)
    outside = np.ones((1800, 2400), dtype=bool)
    outside[rect[1]:rect[3], rect[0]:rect[2]] = False
    assert (arr(out)[outside] == arr(image)[outside]).all()


def test_a_mask_of_another_size_is_stretched_to_the_image() -> None:
    image = noise(96, 64, 4)
    small = Image.new("L", (48, 32), 0)
    small.paste(255, (0, 0, 24, 32))
    out = ops.run(FakePainter(), request("inpaint", image, mask=small))[0]
    assert (arr(out)[:, 52:] == arr(image)[:, 52:]).all() and (arr(out)[:, :44] == colour(5)).all()


def test_an_empty_mask_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest, match="no pixel"):
        ops.run(FakePainter(), request("inpaint", noise(32, 32), mask=Image.new("L", (32, 32), 0)))


def test_outpaint_keeps_the_original_pixels_and_paints_the_new_area() -> None:
    image = noise(60, 40, 5)
    out = ops.run(FakePainter(), request("outpaint", image, outpaint=OutpaintSpec(left=8, top=4, right=12)))[0]
    assert out.size == (80, 44)
    assert (arr(out)[4:44, 8:68] == arr(image)).all()
    new_area = np.ones((44, 80), dtype=bool)
    new_area[4:44, 8:68] = False
    assert (arr(out)[new_area] == colour(5)).all()


def test_an_outpaint_target_smaller_than_the_image_or_too_large_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="smaller"):
        ops.run(FakePainter(), request("outpaint", noise(60, 40), outpaint=OutpaintSpec(width=50, height=60)))
    with pytest.raises(InvalidRequest, match="exceeds"):
        ops.output_size(request("outpaint", noise(60, 40), outpaint=OutpaintSpec(left=4090)))


def test_move_pastes_the_object_and_repaints_the_vacated_area_and_the_seam() -> None:
    image = noise(96, 64, 6)
    spec = MoveSpec(box=(0.125, 0.25, 0.375, 0.75), dx=30, dy=0, scale=0.5, seam=4)  # rect (12, 16, 36, 48)
    req = request("move", image, move=spec)
    canvas, repaint, pasted = ops.move_masks(req)
    out = ops.run(FakePainter(), req)[0]
    assert out.size == (96, 64)
    # the object, halved, is centred 30 px right of (24, 32): rect (48, 24, 60, 40)
    assert g.mask_bbox(pasted) == (48, 24, 60, 40)
    keep = arr(repaint) == 0
    assert (arr(out)[keep] == arr(canvas)[keep]).all()
    assert (arr(out)[~keep] == colour(5)).all()
    obj = image.crop((12, 16, 36, 48)).resize((12, 16), Image.Resampling.LANCZOS)
    assert (arr(out)[26:38, 50:58] == arr(obj)[2:14, 2:10]).all()  # the object's core, inside the seam
    assert (arr(repaint)[16:48, 12:36] == 255).all()  # the vacated source box
    assert arr(repaint)[24, 46] == 255 and arr(repaint)[24, 45] == 0  # seam: 2 px outside ...
    assert arr(repaint)[26, 49] == 255 and arr(repaint)[26, 50] == 0  # ... and 2 px inside


def test_move_with_a_silhouette_mask_moves_only_the_object_pixels() -> None:
    image = noise(64, 64, 11)
    silhouette = Image.new("L", (64, 64), 0)
    silhouette.paste(255, (8, 8, 16, 24))  # the left half of the box (8, 8, 24, 24)
    req = request("move", image, mask=silhouette, move=MoveSpec(box=(0.125, 0.125, 0.375, 0.375), dx=32, seam=0))
    out = ops.run(FakePainter(), req)[0]
    assert (arr(out)[8:24, 40:48] == arr(image)[8:24, 8:16]).all()  # the object, moved
    assert (arr(out)[8:24, 48:56] == arr(image)[8:24, 48:56]).all()  # the rest of the box is not
    assert (arr(out)[8:24, 8:16] == colour(5)).all()  # vacated: repainted
    assert (arr(out)[8:24, 16:24] == arr(image)[8:24, 16:24]).all()


def test_a_move_that_changes_nothing_is_invalid() -> None:
    req = request("move", noise(40, 40), move=MoveSpec(box=(0.2, 0.2, 0.5, 0.5), seam=0))
    with pytest.raises(InvalidRequest, match="changes nothing"):
        ops.run(FakePainter(), req)


# -- upscale -----------------------------------------------------------------------------------


def test_upscale_reports_tiles_times_steps_and_uses_the_tiled_vae() -> None:
    painter = FakePainter()
    calls, on_step = recorder()
    req = request("upscale", noise(64, 48), width=256, height=192, steps=10, strength=0.3,
                  upscale=UpscaleSpec(tile=128, overlap=32))
    out = ops.run(painter, req, on_step)[0]
    tiles = g.tile_plan((256, 192), 128, 32)
    assert out.size == (256, 192) and len(tiles) == 6
    assert ops.planned_steps(req) == 6 * 3
    assert calls == [(i, 18) for i in range(1, 19)]
    assert [c[0] for c in painter.calls] == ["img2img"] * 6 and all(painter.tiling)
    seeds = [c[1][2] for c in painter.calls]
    assert len(set(seeds)) == 6  # every tile its own noise


def test_canceling_an_upscale_stops_at_once_with_overall_counts() -> None:
    painter = FakePainter()
    seen: list[tuple[int, int]] = []

    def cancel_at_8(done: int, total: int) -> bool:
        seen.append((done, total))
        return done < 8

    req = request("upscale", noise(64, 48), width=256, height=192, steps=10, strength=0.3,
                  upscale=UpscaleSpec(tile=128, overlap=32))
    with pytest.raises(RenderInterrupted) as info:
        ops.run(painter, req, cancel_at_8)
    assert (info.value.steps_done, info.value.total_steps) == (8, 18)
    assert seen[-1] == (8, 18) and len(painter.calls) == 3  # the third tile's second step


def test_upscale_with_identity_tiles_is_the_lanczos_enlargement_even_at_2048() -> None:
    image = noise(512, 512, 8)
    out = ops.run(FakePainter(), request("upscale", image, width=2048, height=2048))[0]
    assert (arr(out) == arr(image.resize((2048, 2048), Image.Resampling.LANCZOS))).all()


def test_planned_steps_is_the_total_the_callback_reports_for_every_operation() -> None:
    image = noise(96, 64, 9)
    cases = [
        request("edit", image),
        request("generate", width=64, height=64),
        request("inpaint", image, boxes=[(0, 0, 0.5, 0.5)], strength=0.5),
        request("outpaint", image, outpaint=OutpaintSpec(right=16)),
        request("move", image, move=MoveSpec(box=(0, 0, 0.5, 0.5), dx=4), strength=0.8),
        request("upscale", image, upscale=UpscaleSpec(tile=128, overlap=16)),
    ]
    for case in cases:
        calls, on_step = recorder()
        ops.run(FakePainter(), case, on_step)
        assert calls[-1] == (ops.planned_steps(case), ops.planned_steps(case)), case.operation
    assert [ops.planned_steps(c) for c in cases] == [4, 4, 2, 4, 4, 2 * 2]


@pytest.mark.parametrize(("steps", "strength", "effective"),
                         [(30, 1.0, 30), (30, 0.3, 9), (2, 0.3, 1), (2, 0.01, 1), (10, 0.55, 6), (4, 0.5, 2)])
def test_effective_steps_match_diffusers_strength_rounding(steps: int, strength: float, effective: int) -> None:
    assert ops.effective_steps(steps, strength) == effective


# -- alpha -------------------------------------------------------------------------------------


def test_alpha_is_carried_per_operation_rules() -> None:
    rgba = noise(96, 64, 10, "RGBA")
    alpha = arr(rgba)[:, :, 3]
    out = ops.run(FakePainter(), request("inpaint", rgba, boxes=[(0.1, 0.1, 0.5, 0.5)]))[0]
    assert out.mode == "RGBA" and (arr(out)[:, :, 3] == alpha).all()

    out = ops.run(FakePainter(), request("outpaint", rgba, outpaint=OutpaintSpec(left=4, right=4)))[0]
    assert out.size == (104, 64) and (arr(out)[:, 4:100, 3] == alpha).all()
    assert (arr(out)[:, :4, 3] == 255).all() and (arr(out)[:, 100:, 3] == 255).all()

    out = ops.run(FakePainter(), request("edit", rgba, width=192, height=128))[0]
    expected = Image.fromarray(alpha, "L").resize((192, 128), Image.Resampling.LANCZOS)
    assert out.mode == "RGBA" and (arr(out)[:, :, 3] == arr(expected)).all()

    out = ops.run(FakePainter(), request("upscale", rgba, upscale=UpscaleSpec(tile=64, overlap=16)))[0]
    expected = Image.fromarray(alpha, "L").resize((192, 128), Image.Resampling.LANCZOS)
    assert out.mode == "RGBA" and (arr(out)[:, :, 3] == arr(expected)).all()

    spec = MoveSpec(box=(0.0, 0.0, 0.25, 0.5), dx=48, dy=0)  # rect (0, 0, 24, 32) to (48, 0, 72, 32)
    out = ops.run(FakePainter(), request("move", rgba, move=spec))[0]
    assert (arr(out)[0:32, 48:72, 3] == alpha[0:32, 0:24]).all()
    assert (arr(out)[32:, :, 3] == alpha[32:, :]).all()

    assert ops.run(FakePainter(), request("generate", width=32, height=32))[0].mode == "RGB"
