"""Tiny random-weight models of each Qwen-Image pipeline (workers/pipeline/tiny.py): each saved
folder loads back with ``from_pretrained`` as its own class and renders one small image; the
family's weights differ where the real family's do (the transformer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from workers.pipeline.tiny import TINY_PIPELINES, build_tiny_model

SIDE = 64  # the output side: the smallest both VAEs (8x and 16x, packed 2x2) take


def _load(directory: Path, pipeline: str) -> Any:
    import diffusers

    return getattr(diffusers, pipeline).from_pretrained(directory)


def _built(tmp_path: Path, pipeline: str, seed: int = 0) -> Path:
    return build_tiny_model(tmp_path / pipeline, pipeline=pipeline, seed=seed)


def _picture(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _sampling(seed: int = 0) -> dict[str, Any]:
    return {"num_inference_steps": 2, "true_cfg_scale": 1.0, "generator": torch.Generator().manual_seed(seed)}


@pytest.fixture()
def small_edit_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit pipelines resize every input image to ~1 MP for the VAE whatever the output size
    (the inpaint one renders at 1 MP too): 5 to 25 s of CPU per render here, all of it in the
    tiny VAE. Scale that target area down to the test's size, so a render takes about a second;
    the 1 MP path itself is covered through the renderer in test_pipeline_tiny.py."""
    import diffusers.pipelines.qwenimage as qwenimage

    for name in ("pipeline_qwenimage_edit", "pipeline_qwenimage_edit_plus", "pipeline_qwenimage_edit_inpaint"):
        module = getattr(qwenimage, name)
        real = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, real=real: real(min(area, SIDE * SIDE), ratio))


def _check(images: list[Image.Image]) -> None:
    assert len(images) == 1 and images[0].size == (SIDE, SIDE)
    assert np.asarray(images[0]).std() > 1.0  # an image, not a NaN-turned-black frame


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(one: torch.nn.Module, other: torch.nn.Module) -> bool:
    a, b = _state(one), _state(other)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loaded_as_its_own_class(directory: Path, pipeline: str) -> Any:
    assert json.loads((directory / "model_index.json").read_text())["_class_name"] == pipeline
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size < 2**20  # tiny: CI builds them on the fly
    pipe = _load(directory, pipeline)
    assert type(pipe).__name__ == pipeline
    return pipe


def test_text_to_image(tmp_path: Path) -> None:
    pipe = _loaded_as_its_own_class(_built(tmp_path, "QwenImagePipeline"), "QwenImagePipeline")
    assert "processor" not in pipe.components  # no vision input
    _check(pipe("a red cube", height=SIDE, width=SIDE, **_sampling()).images)


def test_edit(tmp_path: Path, small_edit_inputs: None) -> None:
    pipe = _loaded_as_its_own_class(_built(tmp_path, "QwenImageEditPipeline"), "QwenImageEditPipeline")
    _check(pipe(image=_picture(), prompt="make it blue", height=SIDE, width=SIDE, **_sampling()).images)


def test_multi_image_edit(tmp_path: Path, small_edit_inputs: None) -> None:
    pipe = _loaded_as_its_own_class(_built(tmp_path, "QwenImageEditPlusPipeline"), "QwenImageEditPlusPipeline")
    images = [_picture(0), _picture(1)]
    _check(pipe(image=images, prompt="put the second on the first", height=SIDE, width=SIDE,
                **_sampling()).images)


def test_edit_inpaint(tmp_path: Path, small_edit_inputs: None) -> None:
    pipe = _loaded_as_its_own_class(_built(tmp_path, "QwenImageEditInpaintPipeline"),
                                    "QwenImageEditInpaintPipeline")
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (16, 16, 48, 48))
    _check(pipe(image=_picture(), mask_image=mask, prompt="a hat", height=SIDE, width=SIDE, strength=1.0,
                **_sampling()).images)


def test_qwen_image_2_1_generates_and_edits(tmp_path: Path) -> None:
    pipe = _loaded_as_its_own_class(_built(tmp_path, "QwenImage21Pipeline"), "QwenImage21Pipeline")
    assert type(pipe.text_encoder).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage21"
    assert type(pipe.transformer).__name__ == "QwenImage21Transformer2DModel"
    _check(pipe("a red cube", height=SIDE, width=SIDE, **_sampling()).images)
    _check(pipe("make it blue", image=_picture(), output_resolution=SIDE, **_sampling()).images)


def test_the_text_to_image_weights_are_not_the_edit_models(tmp_path: Path) -> None:
    """Read from the loaded pipelines: the transformers differ (distinct models), the text encoder
    and VAE are the family's shared ones, and the edit inpaint pipeline runs the edit weights."""
    t2i = _load(_built(tmp_path, "QwenImagePipeline"), "QwenImagePipeline")
    edit = _load(_built(tmp_path, "QwenImageEditPipeline"), "QwenImageEditPipeline")
    plus = _load(_built(tmp_path, "QwenImageEditPlusPipeline"), "QwenImageEditPlusPipeline")
    inpaint = _load(_built(tmp_path, "QwenImageEditInpaintPipeline"), "QwenImageEditInpaintPipeline")
    assert type(t2i.transformer) is type(edit.transformer)  # same architecture ...
    assert not _same(t2i.transformer, edit.transformer)  # ... other weights
    assert not _same(plus.transformer, edit.transformer) and not _same(plus.transformer, t2i.transformer)
    assert _same(t2i.text_encoder, edit.text_encoder) and _same(t2i.vae, edit.vae)
    assert _same(inpaint.transformer, edit.transformer)


def test_every_pipeline_is_deterministic_per_seed(tmp_path: Path) -> None:
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    for pipeline in TINY_PIPELINES:
        one = _built(tmp_path / "a", pipeline, seed=3)
        again = _built(tmp_path / "b", pipeline, seed=3)
        other = _built(tmp_path / "c", pipeline, seed=4)
        assert (one / weights).read_bytes() == (again / weights).read_bytes(), pipeline
        assert (one / weights).read_bytes() != (other / weights).read_bytes(), pipeline


def test_an_unknown_pipeline_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="QwenImagePipeline"):
        build_tiny_model(tmp_path / "x", pipeline="FluxPipeline")
    assert not (tmp_path / "x").exists()


def test_the_tiny_family_covers_every_pipeline_the_catalog_knows() -> None:
    from broker.catalog import KNOWN_PIPELINES

    assert set(TINY_PIPELINES) == set(KNOWN_PIPELINES)
