"""Every operation through ``DiffusersRenderer`` with the tiny random-weight model on CPU.

Small images and 2-4 steps keep each render well under a second, except edits, whose
condition image is always VAE-encoded at ~1 MP.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from broker.schema import OutputFormat
from workers import geometry as g
from workers import operations as ops
from workers.encode import encode_output
from workers.pipeline import MoveSpec, OutpaintSpec, RenderInterrupted, RenderRequest, UpscaleSpec
from workers.pipeline.diffusers_renderer import DiffusersRenderer


@pytest.fixture(scope="module")
def renderer(tiny_model: Path) -> DiffusersRenderer:
    return DiffusersRenderer.load(str(tiny_model), device="cpu")


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


IMAGE = noise(64, 48, 1)


def request(operation: str, **fields: Any) -> RenderRequest:
    base: dict[str, Any] = {
        "operation": operation, "prompt": "a red ball", "negative_prompt": None, "steps": 2,
        "true_cfg_scale": 1.0, "seed": 11, "images": [IMAGE],
    }
    base.update(fields)
    return RenderRequest(**base)


CASES: dict[str, RenderRequest] = {
    "edit": request("edit", width=64, height=48, true_cfg_scale=4.0, negative_prompt="blurry"),
    "edit with a reference": request("edit", images=[IMAGE, noise(32, 32, 2)], width=48, height=48),
    "generate": request("generate", images=[], width=80, height=48),
    "inpaint": request("inpaint", boxes=[(0.25, 0.25, 0.6, 0.75)], steps=4, strength=0.5,
                       negative_prompt="blurry", true_cfg_scale=3.0),
    "outpaint": request("outpaint", outpaint=OutpaintSpec(left=16, right=9, top=5)),
    "move": request("move", move=MoveSpec(box=(0.1, 0.2, 0.4, 0.6), dx=20, dy=4, scale=0.85)),
    "upscale": request("upscale", images=[noise(128, 96, 3)], width=256, height=192, strength=0.5,
                       upscale=UpscaleSpec(tile=128, overlap=32)),
}
SIZES = {"edit": (64, 48), "edit with a reference": (48, 48), "generate": (80, 48), "inpaint": (64, 48),
         "outpaint": (89, 53), "move": (64, 48), "upscale": (256, 192)}


@pytest.fixture(scope="module")
def runs(renderer: DiffusersRenderer) -> dict[str, tuple[list[Image.Image], list[Image.Image], list[tuple[int, int]]]]:
    """Each case rendered twice; the first run's progress calls recorded."""
    results = {}
    for name, case in CASES.items():
        calls: list[tuple[int, int]] = []

        def record(done: int, total: int, calls: list[tuple[int, int]] = calls) -> bool:
            calls.append((done, total))
            return True

        first = renderer.render(case, record)
        results[name] = (first, renderer.render(case), calls)
    return results


# -- one set of weights ------------------------------------------------------------------------


def test_every_pipeline_shares_the_loaded_models(renderer: DiffusersRenderer) -> None:
    base = renderer.pipe
    for kind in ("edit", "edit_plus", "generate", "inpaint", "img2img"):
        pipe = renderer.pipeline(kind)
        assert pipe.transformer is base.transformer, kind
        assert pipe.vae is base.vae and pipe.text_encoder is base.text_encoder, kind
        assert pipe.tokenizer is base.tokenizer, kind
        assert kind == "edit" or pipe.scheduler is not base.scheduler, kind  # stateful, so per pipeline
    assert renderer.pipeline("edit_plus").processor is base.processor
    assert renderer.pipeline("inpaint") is renderer.pipeline("inpaint")
    assert type(renderer.pipeline("inpaint")).__name__ == "QwenImageInpaintPipeline"
    with pytest.raises(ValueError):
        renderer.pipeline("controlnet")


def test_making_the_other_pipelines_keeps_a_bf16_model_in_bf16(tiny_model: Path) -> None:
    # from_pipe casts to float32 unless told otherwise; on shared modules that is in place.
    bf16 = DiffusersRenderer.load(str(tiny_model), device="cpu", dtype="bf16")
    for kind in ("edit_plus", "generate", "inpaint", "img2img"):
        bf16.pipeline(kind)
    for module in (bf16.pipe.transformer, bf16.pipe.vae, bf16.pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


# -- sizes, determinism, progress --------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_each_operation_outputs_its_documented_size(runs: dict[str, Any], name: str) -> None:
    first = runs[name][0]
    assert len(first) == 1 and first[0].size == SIZES[name] == ops.output_size(CASES[name])
    assert first[0].mode == "RGB" and arr(first[0]).std() > 1.0  # not a NaN-turned-black frame


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_request_gives_the_same_bytes_for_every_operation(runs: dict[str, Any], name: str) -> None:
    first, second, _ = runs[name]
    assert first[0].tobytes() == second[0].tobytes()


@pytest.mark.parametrize("name", ["generate", "inpaint", "outpaint", "move", "upscale"])
def test_another_seed_gives_another_image(renderer: DiffusersRenderer, runs: dict[str, Any], name: str) -> None:
    other = renderer.render(RenderRequest(**{**CASES[name].__dict__, "seed": 12}))
    assert other[0].tobytes() != runs[name][0][0].tobytes()


@pytest.mark.parametrize("name", list(CASES))
def test_progress_counts_one_to_the_planned_total(runs: dict[str, Any], name: str) -> None:
    total = ops.planned_steps(CASES[name])
    assert runs[name][2] == [(i, total) for i in range(1, total + 1)]
    assert {"inpaint": 2, "upscale": 6}.get(name, 2) == total  # strength 0.5 of 4 steps; 6 tiles x 1


def test_num_images_gives_distinct_outputs_deterministically(renderer: DiffusersRenderer) -> None:
    for case in (request("generate", images=[], width=48, height=32, num_images=3),
                 request("inpaint", boxes=[(0.1, 0.1, 0.9, 0.9)], num_images=2)):
        first, again = renderer.render(case), renderer.render(case)
        assert len(first) == case.num_images
        assert len({image.tobytes() for image in first}) == case.num_images
        assert [i.tobytes() for i in first] == [i.tobytes() for i in again]


# -- what each operation keeps -----------------------------------------------------------------


def test_inpaint_leaves_every_pixel_outside_the_mask_unchanged(runs: dict[str, Any]) -> None:
    out = arr(runs["inpaint"][0][0])
    mask = arr(g.mask_from_boxes(IMAGE.size, CASES["inpaint"].boxes)) == 255
    assert (out[~mask] == arr(IMAGE)[~mask]).all()
    assert (out[mask] != arr(IMAGE)[mask]).any()


def test_inpaint_with_a_mask_image_of_another_size_keeps_the_rest(renderer: DiffusersRenderer) -> None:
    image = noise(100, 70, 4)  # not multiples of 16: rendered at 96 x 64, composited at 100 x 70
    mask = Image.new("L", (50, 35), 0)
    mask.paste(255, (10, 10, 30, 20))
    out = renderer.render(request("inpaint", images=[image], mask=mask))[0]
    keep = arr(g.binarize(mask, image.size)) == 0
    assert out.size == (100, 70) and (arr(out)[keep] == arr(image)[keep]).all()


def test_outpaint_grows_the_canvas_and_keeps_the_original_pixels(runs: dict[str, Any]) -> None:
    out = runs["outpaint"][0][0]
    assert out.size == (16 + 64 + 9, 5 + 48)
    assert (arr(out)[5:53, 16:80] == arr(IMAGE)).all()


def test_outpaint_to_a_target_size_and_direction(renderer: DiffusersRenderer) -> None:
    out = renderer.render(request("outpaint", outpaint=OutpaintSpec(width=96, direction="left")))[0]
    assert out.size == (96, 48) and (arr(out)[:, 32:] == arr(IMAGE)).all()


def test_move_changes_only_the_vacated_area_and_the_seam(runs: dict[str, Any]) -> None:
    out = runs["move"][0][0]
    canvas, repaint, pasted = ops.move_masks(CASES["move"])
    keep = arr(repaint) == 0
    assert (arr(out)[keep] == arr(canvas)[keep]).all()
    assert (arr(out)[~keep] != arr(canvas)[~keep]).any()
    # the box is (6, 9, 26, 29) px, centre (16, 19); scaled 0.85 to 17 x 17 around (36, 23)
    assert g.mask_bbox(pasted) == (28, 15, 45, 32)


def test_upscale_is_the_feathered_blend_of_the_refined_tiles(renderer: DiffusersRenderer,
                                                             runs: dict[str, Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tiles: list[Image.Image] = []
    real = renderer.img2img

    def capture(*args: Any, **kwargs: Any) -> list[Image.Image]:
        out = real(*args, **kwargs)
        tiles.append(out[0])
        return out

    monkeypatch.setattr(renderer, "img2img", capture)
    out = renderer.render(CASES["upscale"])[0]
    plan = g.tile_plan((256, 192), 128, 32)
    assert len(tiles) == len(plan) == 6
    assert out.tobytes() == runs["upscale"][0][0].tobytes()
    assert out.tobytes() == g.blend_tiles((256, 192), list(zip(plan, tiles, strict=True))).tobytes()
    # where only the first two tiles overlap (x in [64, 128), y < 64) the output mixes both
    left, right = arr(tiles[0])[:64, 64:128].astype(int), arr(tiles[1])[:64, :64].astype(int)
    mixed = arr(out)[:64, 64:128].astype(int)
    assert (mixed != left).any() and (mixed != right).any()
    assert (mixed >= np.minimum(left, right) - 1).all() and (mixed <= np.maximum(left, right) + 1).all()
    assert not renderer.pipe.vae.use_tiling  # tiling was on only during the upscale


def test_canceling_an_upscale_stops_within_one_step(renderer: DiffusersRenderer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = renderer.img2img

    def count(*args: Any, **kwargs: Any) -> list[Image.Image]:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(renderer, "img2img", count)
    with pytest.raises(RenderInterrupted) as info:
        renderer.render(CASES["upscale"], lambda done, total: done < 3)
    assert (info.value.steps_done, info.value.total_steps) == (3, 6) and calls == 3


def test_a_2048_upscale_plans_nine_1024_tiles() -> None:
    case = request("upscale", images=[noise(1024, 1024)], width=2048, height=2048, steps=30)
    assert ops.output_size(case) == (2048, 2048)
    assert ops.planned_steps(case) == 9 * ops.effective_steps(30, 0.3) == 81


# -- alpha and files ---------------------------------------------------------------------------


def test_an_rgba_input_keeps_its_alpha_in_the_png(renderer: DiffusersRenderer) -> None:
    rgba = noise(64, 48, 5, "RGBA")
    out = renderer.render(request("inpaint", images=[rgba], boxes=[(0.2, 0.2, 0.5, 0.5)]))[0]
    png = Image.open(io.BytesIO(encode_output(out, OutputFormat.PNG, dpi=300)))
    assert png.mode == "RGBA" and png.size == (64, 48)
    assert (arr(png)[:, :, 3] == arr(rgba)[:, :, 3]).all()
    mask = arr(g.mask_from_boxes((64, 48), [(0.2, 0.2, 0.5, 0.5)])) == 255
    assert (arr(png)[~mask] == arr(rgba)[~mask]).all()

    out = renderer.render(request("outpaint", images=[rgba], outpaint=OutpaintSpec(right=16)))[0]
    assert out.mode == "RGBA" and (arr(out)[:, :64, 3] == arr(rgba)[:, :, 3]).all()
    assert (arr(out)[:, 64:, 3] == 255).all()


def test_rendered_files_carry_the_dpi(runs: dict[str, Any]) -> None:
    image = runs["generate"][0][0]
    png = Image.open(io.BytesIO(encode_output(image, OutputFormat.PNG, dpi=300)))
    jpeg = Image.open(io.BytesIO(encode_output(image, OutputFormat.JPEG, quality=90, dpi=300)))
    assert tuple(round(v) for v in png.info["dpi"]) == (300, 300) and jpeg.info["dpi"] == (300, 300)
