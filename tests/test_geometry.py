"""Image geometry of the render operations: pure functions, exact, no model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from workers import geometry as g


def noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# -- boxes and masks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "size", "rect"),
    [
        ((0.0, 0.0, 1.0, 1.0), (100, 50), (0, 0, 100, 50)),
        ((0.25, 0.0, 0.5, 1.0), (100, 10), (25, 0, 50, 10)),
        ((0.251, 0.1, 0.502, 0.9), (100, 10), (25, 1, 51, 9)),
        ((0.3, 0.3, 0.7, 0.7), (100, 100), (30, 30, 70, 70)),  # 0.3 * 100 is 30.000000000000004
        ((0.5, 0.5, 0.5001, 0.5001), (100, 100), (50, 50, 51, 51)),  # thinner than a pixel: one pixel
        ((0.999, 0.999, 1.0, 1.0), (10, 10), (9, 9, 10, 10)),
    ],
)
def test_a_relative_box_covers_every_pixel_it_touches(box, size, rect) -> None:  # type: ignore[no-untyped-def]
    assert g.box_to_rect(box, size) == rect


def test_a_mask_from_boxes_is_white_exactly_on_the_union_of_their_pixels() -> None:
    mask = g.mask_from_boxes((100, 80), [(0.1, 0.1, 0.3, 0.5), (0.2, 0.4, 0.6, 0.6)])
    assert mask.mode == "L" and mask.size == (100, 80)
    a = arr(mask)
    assert set(np.unique(a)) == {0, 255}
    expected = np.zeros((80, 100), dtype=bool)
    expected[8:40, 10:30] = True
    expected[32:48, 20:60] = True
    assert ((a == 255) == expected).all()
    assert (a == 255).sum() == expected.sum() == 32 * 20 + 16 * 40 - 8 * 10


def test_binarize_thresholds_luminance_and_stretches_a_mask_of_another_size() -> None:
    mask = Image.fromarray(np.array([[0, 127], [128, 255]], dtype=np.uint8), "L")
    assert arr(g.binarize(mask)).tolist() == [[0, 0], [255, 255]]
    big = g.binarize(Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L"), size=(40, 10))
    assert big.size == (40, 10)
    assert (arr(big)[:, :15] == 0).all() and (arr(big)[:, 25:] == 255).all()
    rgb = Image.new("RGB", (4, 4), (255, 255, 255))
    assert (arr(g.binarize(rgb)) == 255).all()


def test_mask_bbox_is_the_tight_box_or_none() -> None:
    mask = Image.new("L", (50, 40), 0)
    assert g.mask_bbox(mask) is None
    mask.paste(255, (5, 6, 20, 30))
    assert g.mask_bbox(mask) == (5, 6, 20, 30)


def test_dilate_grows_a_square_by_px_on_every_side_and_erode_shrinks_it_back() -> None:
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (10, 10, 20, 20))
    grown = arr(g.dilate(mask, 3)) == 255
    assert g.mask_bbox(g.dilate(mask, 3)) == (7, 7, 23, 23) and grown.sum() == 16 * 16
    assert (arr(g.erode(g.dilate(mask, 3), 3)) == arr(mask)).all()
    assert g.mask_bbox(g.erode(mask, 2)) == (12, 12, 18, 18)
    assert (arr(g.dilate(mask, 0)) == arr(mask)).all()


def test_erode_does_not_shrink_away_from_the_image_border() -> None:
    mask = Image.new("L", (20, 20), 0)
    mask.paste(255, (0, 0, 10, 20))  # touches the left, top and bottom borders
    assert g.mask_bbox(g.erode(mask, 2)) == (0, 0, 8, 20)


def test_composite_keeps_every_pixel_outside_the_mask_bit_for_bit() -> None:
    original, generated = noise(64, 48, 1), noise(64, 48, 2)
    mask = g.mask_from_boxes((64, 48), [(0.2, 0.2, 0.6, 0.7)])
    out = arr(g.composite(original, generated, mask))
    inside = arr(mask) == 255
    assert (out[~inside] == arr(original)[~inside]).all()
    assert (out[inside] == arr(generated)[inside]).all()
    with pytest.raises(ValueError):
        g.composite(original, generated.resize((10, 10)), mask)


def test_context_region_is_the_whole_image_when_small_and_the_padded_mask_box_when_large() -> None:
    assert g.context_region((800, 600), (10, 10, 20, 20), max_pixels=1024 * 1024) == (0, 0, 800, 600)
    region = g.context_region((4000, 3000), (1000, 1000, 1200, 1100), max_pixels=1024 * 1024)
    assert region == (1000 - 64, 1000 - 64, 1200 + 64, 1100 + 64)
    region = g.context_region((4000, 3000), (0, 2000, 1000, 3000), max_pixels=1024 * 1024)
    assert region == (0, 2000 - 250, 1000 + 250, 3000)


@pytest.mark.parametrize(
    ("size", "fitted"),
    [((96, 64), (96, 64)), ((100, 70), (96, 64)), ((4000, 3000), (1184, 880)), ((5, 5), (16, 16)),
     ((1024, 1024), (1024, 1024))],
)
def test_fit_size_scales_down_to_the_pixel_budget_in_multiples_of_16(size, fitted) -> None:  # type: ignore[no-untyped-def]
    assert g.fit_size(size, 1024 * 1024) == fitted


def test_the_default_edit_size_is_about_one_megapixel_with_the_input_aspect() -> None:
    assert g.one_megapixel_size((96, 64)) == (1248, 832)
    assert g.one_megapixel_size((64, 64)) == (1024, 1024)


# -- outpaint ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "margins"),
    [
        ("right", (0, 10, 40, 10)),
        ("left", (40, 10, 0, 10)),
        ("top", (20, 20, 20, 0)),
        ("bottom", (20, 0, 20, 20)),
        ("center", (20, 10, 20, 10)),
        ("top-left", (40, 20, 0, 0)),
        ("bottom-right", (0, 0, 40, 20)),
    ],
)
def test_outpaint_margins_put_the_new_area_where_the_direction_says(direction, margins) -> None:  # type: ignore[no-untyped-def]
    assert g.outpaint_margins((100, 50), (140, 70), direction) == margins


def test_outpaint_margins_give_an_odd_pixel_to_the_right_and_bottom_and_refuse_shrinking() -> None:
    assert g.outpaint_margins((100, 50), (101, 53), "center") == (0, 1, 1, 2)
    with pytest.raises(ValueError, match="smaller"):
        g.outpaint_margins((100, 50), (90, 60), "center")
    with pytest.raises(ValueError, match="direction"):
        g.outpaint_margins((100, 50), (120, 60), "left-right")


def test_expand_canvas_has_the_new_size_the_original_pixels_and_a_mask_of_the_new_area() -> None:
    image = noise(30, 20, 3)
    canvas, mask = g.expand_canvas(image, left=5, top=2, right=7, bottom=3)
    assert canvas.size == mask.size == (42, 25)
    assert (arr(canvas)[2:22, 5:35] == arr(image)).all()
    m = arr(mask)
    assert (m[2:22, 5:35] == 0).all() and (m == 255).sum() == 42 * 25 - 30 * 20
    assert (arr(canvas)[2:22, 0] == arr(image)[:, 0]).all()  # new area repeats the edge pixel
    assert (arr(canvas)[0, 5:35] == arr(image)[0]).all()


def test_expand_canvas_works_on_single_channel_images_too() -> None:
    alpha = Image.new("L", (4, 4), 9)
    canvas, _ = g.expand_canvas(alpha, 1, 1, 1, 1)
    assert canvas.mode == "L" and canvas.size == (6, 6) and (arr(canvas) == 9).all()


# -- move --------------------------------------------------------------------------------------


def test_move_pastes_the_scaled_object_at_its_shifted_centre() -> None:
    image = noise(100, 80, 4)
    rect = (20, 20, 60, 40)  # 40 x 20, centre (40, 30)
    canvas, pasted, vacated, dest = g.move_object(image, rect, dx=30, dy=-5, scale=0.5)
    assert dest == (60, 20, 80, 30)  # 20 x 10 centred on (70, 25)
    assert g.mask_bbox(pasted) == dest and (arr(pasted) == 255).sum() == 200
    expected = image.crop(rect).resize((20, 10), Image.Resampling.LANCZOS)
    assert (arr(canvas)[20:30, 60:80] == arr(expected)).all()
    outside = arr(pasted) == 0
    assert (arr(canvas)[outside] == arr(image)[outside]).all()
    source = np.zeros((80, 100), dtype=bool)
    source[20:40, 20:60] = True
    assert ((arr(vacated) == 255) == (source & outside)).all()


def test_move_without_offset_or_scale_vacates_nothing_and_clips_at_the_border() -> None:
    image = noise(50, 50, 5)
    canvas, pasted, vacated, _ = g.move_object(image, (10, 10, 20, 20), 0, 0, 1.0)
    assert (arr(canvas) == arr(image)).all() and g.mask_bbox(vacated) is None
    canvas, pasted, vacated, dest = g.move_object(image, (10, 10, 20, 20), dx=40, dy=0, scale=1.0)
    assert dest == (50, 10, 60, 20)  # wholly outside: the object is removed
    assert g.mask_bbox(pasted) is None and g.mask_bbox(vacated) == (10, 10, 20, 20)
    _, pasted, _, _ = g.move_object(image, (10, 10, 20, 20), dx=35, dy=0, scale=1.0)
    assert g.mask_bbox(pasted) == (45, 10, 50, 20)


def test_move_with_a_silhouette_moves_only_the_object_pixels() -> None:
    image = noise(60, 60, 6)
    silhouette = Image.new("L", (60, 60), 0)
    silhouette.paste(255, (10, 10, 15, 20))  # the left half of the box (10, 10, 20, 20)
    canvas, pasted, vacated, _ = g.move_object(image, (10, 10, 20, 20), 20, 0, 1.0, silhouette)
    assert g.mask_bbox(pasted) == (30, 10, 35, 20)
    assert g.mask_bbox(vacated) == (10, 10, 15, 20)
    assert (arr(canvas)[10:20, 30:35] == arr(image)[10:20, 10:15]).all()
    assert (arr(canvas)[10:20, 35:40] == arr(image)[10:20, 35:40]).all()


# -- tiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "tile", "overlap"), [((2048, 2048), 1024, 128), ((512, 384), 128, 32),
                                                        ((300, 100), 128, 60), ((100, 60), 128, 32)])
def test_the_tile_plan_covers_the_image_with_at_least_the_overlap(size, tile, overlap) -> None:  # type: ignore[no-untyped-def]
    plan = g.tile_plan(size, tile, overlap)
    width, height = size
    coverage = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in plan:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (x1 - x0, y1 - y0) == (min(tile, width), min(tile, height))
        coverage[y0:y1, x0:x1] += 1
    assert (coverage >= 1).all()
    for starts, length in ((sorted({r[0] for r in plan}), width), (sorted({r[1] for r in plan}), height)):
        side = min(tile, length)
        assert starts[0] == 0 and starts[-1] + side == length
        for a, b in itertools.pairwise(starts):
            assert a + side - b >= overlap


def test_a_2048_upscale_at_1024_tiles_is_three_by_three() -> None:
    assert len(g.tile_plan((2048, 2048), 1024, 128)) == 9
    assert g.axis_starts(2048, 1024, 128) == [0, 512, 1024]
    assert g.tile_plan((1024, 640), 1024, 128) == [(0, 0, 1024, 640)]


@pytest.mark.parametrize(("size", "tile", "overlap"), [((256, 192), 128, 32), ((300, 100), 128, 60),
                                                        ((197, 64), 64, 0)])
def test_blending_tiles_cut_from_one_image_reproduces_it_exactly(size, tile, overlap) -> None:  # type: ignore[no-untyped-def]
    image = noise(size[0], size[1], seed=7)
    plan = g.tile_plan(size, tile, overlap)
    assert (arr(g.blend_tiles(size, [(r, image.crop(r)) for r in plan])) == arr(image)).all()


def test_two_overlapping_tiles_cross_fade_linearly_across_the_overlap() -> None:
    plan = g.tile_plan((192, 16), 128, 64)  # tiles at x = 0 and 64: overlap [64, 128)
    assert plan == [(0, 0, 128, 16), (64, 0, 192, 16)]
    black, white = Image.new("RGB", (128, 16), 0), Image.new("RGB", (128, 16), (255, 255, 255))
    row = arr(g.blend_tiles((192, 16), [(plan[0], black), (plan[1], white)]))[0, :, 0].astype(int)
    assert (row[:64] == 0).all() and (row[128:] == 255).all()
    ramp = row[64:128]
    assert (np.diff(ramp) >= 0).all() and ramp[0] < 5 and ramp[-1] > 250
    expected = np.rint(255 * (np.arange(64) + 0.5) / 64)
    assert np.abs(ramp - expected).max() <= 1
    weights = [g.tile_weights(r, plan) for r in plan]
    assert all((w > 0).all() for w in weights)
    assert np.allclose(weights[0][0, 64:] + weights[1][0, :64], 1.0)


def test_blend_tiles_refuses_a_tile_of_the_wrong_size() -> None:
    with pytest.raises(ValueError):
        g.blend_tiles((64, 64), [((0, 0, 64, 64), Image.new("RGB", (32, 32)))])


def test_upscale_target_doubles_in_multiples_of_16_and_fits_2048_keeping_the_aspect() -> None:
    assert g.upscale_target((256, 256), 2.0, 2048) == (512, 512)
    assert g.upscale_target((100, 70), 2.0, 2048) == (192, 144)
    assert g.upscale_target((1600, 800), 2.0, 2048) == (2048, 1024)
    assert g.upscale_target((3000, 1000), 2.0, 2048) == (2048, 688)


# -- alpha and seeds ---------------------------------------------------------------------------


def test_split_alpha_separates_rgba_and_attach_alpha_puts_it_back_resized() -> None:
    rgba = noise(20, 10, 8, "RGBA")
    rgb, alpha = g.split_alpha(rgba)
    assert rgb.mode == "RGB" and alpha is not None and alpha.mode == "L"
    assert (arr(g.attach_alpha(rgb, alpha)) == arr(rgba)).all()
    assert g.split_alpha(rgb) == (rgb, None)
    assert g.attach_alpha(rgb, None).mode == "RGB"
    big = g.attach_alpha(rgb.resize((40, 20)), Image.new("L", (20, 10), 77))
    assert big.mode == "RGBA" and (arr(big)[:, :, 3] == 77).all()
    paletted = Image.new("P", (4, 4))
    paletted.info["transparency"] = 0
    assert g.split_alpha(paletted)[1] is not None


def test_derived_seeds_are_deterministic_64_bit_and_differ_by_salt() -> None:
    seeds = {g.derive_seed(7, i) for i in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**64 for s in seeds)
    assert g.derive_seed(7, 3) == g.derive_seed(7, 3) != g.derive_seed(8, 3)
    assert g.derive_seed(2**64 - 1, 0) == g.derive_seed(2**64 - 1, 0)
