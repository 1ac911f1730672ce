"""A worker loads one catalog model as its own pipeline class and serves what those weights can
run: each tiny model of the family (workers/pipeline/tiny.py) loaded through ``load_renderer(...,
pipeline=...)`` renders every operation broker/catalog.py's ``PIPELINE_OPERATIONS`` gives its class
and refuses the others; a catalog entry's fused LoRAs, scheduler overrides and profile reach the
loaded model. CPU, real diffusers classes, 2-step renders at 64 px."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from broker.catalog import PIPELINE_OPERATIONS, FusedLora, ModelDefaults, ModelSpec
from broker.schema import Operation
from broker.tenanttext import find_leaks
from workers.pipeline import (
    OPERATIONS,
    InvalidRequest,
    MoveSpec,
    OutpaintSpec,
    Previews,
    RenderRequest,
    UnsupportedOperation,
    UpscaleSpec,
    load_renderer,
)
from workers.pipeline.diffusers_renderer import (
    OPERATION_KINDS,
    PIPELINE_KINDS,
    DiffusersRenderer,
    latent_preview,
)
from workers.pipeline.presets import PresetError
from workers.pipeline.tiny import TINY_PIPELINES, build_tiny_model, write_tiny_lora
from workers.render_setup import fused_lora_fetcher, load_options
from workers.settings import WorkerSettings

SIDE = 64
IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8), "RGB")
REFERENCE = IMAGE.rotate(90, expand=True)


def request(operation: str, **fields: Any) -> RenderRequest:
    base: dict[str, Any] = {"operation": operation, "prompt": "a red ball", "negative_prompt": None, "steps": 2,
                            "true_cfg_scale": 1.0, "seed": 11, "images": [IMAGE]}
    base.update(fields)
    return RenderRequest(**base)


# each operation once, with the size it must come out at
CASES: dict[str, tuple[RenderRequest, tuple[int, int]]] = {
    "edit": (request("edit", width=64, height=48, true_cfg_scale=2.0), (64, 48)),
    "generate": (request("generate", images=[], width=64, height=48), (64, 48)),
    "inpaint": (request("inpaint", boxes=[(0.25, 0.25, 0.6, 0.75)]), (64, 48)),
    "outpaint": (request("outpaint", outpaint=OutpaintSpec(left=16)), (80, 48)),
    "move": (request("move", move=MoveSpec(box=(0.1, 0.2, 0.4, 0.6), dx=8)), (64, 48)),
    "upscale": (request("upscale", width=128, height=96, strength=0.5, upscale=UpscaleSpec(tile=64, overlap=16)),
                (128, 96)),
}
MULTI_IMAGE_EDIT = request("edit", images=[IMAGE, REFERENCE], width=48, height=48, num_images=2)


@pytest.fixture(autouse=True)
def small_condition_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit classes resize their condition images to ~1 MP (the edit inpaint one renders at
    1 MP too) and 2.1 to ``output_resolution``²: seconds of tiny-VAE work per call on a CPU. Cap
    that area at the test's size, as tests/test_pipeline_family.py does; the 1 MP path itself is
    covered through the renderer in test_pipeline_tiny.py."""
    names = ("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit",
             "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus",
             "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint",
             "diffusers.pipelines.qwenimage21.pipeline_qwenimage21")
    for name in names:
        module = importlib.import_module(name)
        real = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, real=real: real(min(area, SIDE * SIDE), ratio))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("family")
    return {pipeline: build_tiny_model(folder / pipeline, pipeline=pipeline) for pipeline in TINY_PIPELINES}


_loaded: dict[str, DiffusersRenderer] = {}


def loaded(models: dict[str, Path], pipeline: str) -> DiffusersRenderer:
    """The model of ``pipeline`` loaded the way a worker loads a catalog entry (once per module)."""
    if pipeline not in _loaded:
        renderer = load_renderer(str(models[pipeline]), "cpu", pipeline=pipeline)
        assert isinstance(renderer, DiffusersRenderer)
        _loaded[pipeline] = renderer
    return _loaded[pipeline]


def served(pipeline: str) -> list[str]:
    return [op for op in OPERATIONS if Operation(op) in PIPELINE_OPERATIONS[pipeline]]


def _picture(image: Image.Image) -> bool:
    return float(np.asarray(image.convert("RGB")).std()) > 1.0  # an image, not a NaN-turned-black frame


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- each class serves what its weights can run --------------------------------------------------


@pytest.mark.parametrize("pipeline", TINY_PIPELINES)
def test_a_model_loaded_as_its_class_renders_every_operation_it_serves(models: dict[str, Path],
                                                                        pipeline: str) -> None:
    renderer = loaded(models, pipeline)
    assert type(renderer.pipe).__name__ == pipeline and renderer.pipeline_name == pipeline
    assert list(renderer.operations) == served(pipeline)
    renderer.healthcheck()
    for operation in served(pipeline):
        case, size = CASES[operation]
        images = renderer.render(case)
        assert [image.size for image in images] == [size], operation
        assert all(_picture(image) for image in images), operation
    if "edit" in renderer.operations:  # several images: the Plus pipeline, or 2.1's condition images
        images = renderer.render(MULTI_IMAGE_EDIT)
        assert [image.size for image in images] == [(48, 48)] * 2 and all(_picture(i) for i in images)


@pytest.mark.parametrize("pipeline", TINY_PIPELINES)
def test_an_operation_the_model_does_not_serve_is_refused_for_the_tenant(models: dict[str, Path],
                                                                         pipeline: str) -> None:
    renderer = loaded(models, pipeline)
    refused = [op for op in OPERATIONS if op not in served(pipeline)]
    if not refused:
        pytest.skip(f"{pipeline} serves every operation")
    with pytest.raises(UnsupportedOperation) as caught:
        renderer.render(CASES[refused[0]][0])
    assert isinstance(caught.value, InvalidRequest)  # the job's fault, not the device's: no retry
    message = str(caught.value)
    assert f"does not serve {refused[0]} jobs" in message and ", ".join(renderer.operations) in message
    assert not find_leaks(message) and "Pipeline" not in message  # no class names for the tenant


def test_every_served_operation_has_the_pipelines_it_needs() -> None:
    """The renderer's table and the catalog's agree: what the catalog routes to a class, the
    class's renderer can build a pipeline for."""
    assert set(PIPELINE_KINDS) == set(PIPELINE_OPERATIONS)
    for pipeline, operations in PIPELINE_OPERATIONS.items():
        for operation in operations:
            needs = OPERATION_KINDS[operation.value]
            assert set(needs) <= set(PIPELINE_KINDS[pipeline]), (pipeline, operation)


def test_the_text_to_image_model_is_not_the_edit_models_weights(models: dict[str, Path]) -> None:
    t2i, edit = loaded(models, "QwenImagePipeline"), loaded(models, "QwenImageEditPipeline")
    assert "processor" not in t2i.pipe.components and "processor" in edit.pipe.components
    mine, theirs = _state(t2i.pipe.transformer), _state(edit.pipe.transformer)
    assert mine.keys() == theirs.keys()
    assert not all(torch.equal(mine[k], theirs[k]) for k in mine)  # other transformer weights
    # its generate runs on the loaded pipeline itself, not one made from edit components
    assert t2i.pipeline("generate") is t2i.pipe
    assert edit.pipeline("generate") is not edit.pipe and edit.pipeline("generate").transformer is edit.pipe.transformer


def test_the_edit_classes_build_the_other_pipeline_from_shared_components(models: dict[str, Path]) -> None:
    plus = loaded(models, "QwenImageEditPlusPipeline")
    assert plus.pipeline("edit_plus") is plus.pipe  # multi-image edits on the loaded class
    single = plus.pipeline("edit")
    assert type(single).__name__ == "QwenImageEditPipeline" and single.transformer is plus.pipe.transformer
    with pytest.raises(ValueError, match="no pipeline kind"):
        loaded(models, "QwenImageEditInpaintPipeline").pipeline("generate")


def test_a_served_subset_is_refused_beyond_it_and_warmed_up_within_it(models: dict[str, Path]) -> None:
    renderer = load_renderer(str(models["QwenImageEditPipeline"]), "cpu", pipeline="QwenImageEditPipeline",
                             operations=("generate", "upscale"))
    assert isinstance(renderer, DiffusersRenderer)
    assert renderer.operations == ("generate", "upscale") and renderer.warmup_operation == "generate"
    renderer.warmup()
    with pytest.raises(UnsupportedOperation):
        renderer.render(CASES["edit"][0])
    with pytest.raises(ValueError, match="serves"):
        load_renderer(str(models["QwenImagePipeline"]), "cpu", pipeline="QwenImagePipeline", operations=("edit",))
    with pytest.raises(ValueError, match="unknown pipeline"):
        load_renderer(str(models["QwenImagePipeline"]), "cpu", pipeline="FluxPipeline")


@pytest.mark.parametrize(("pipeline", "operation"), [("QwenImagePipeline", "generate"),
                                                     ("QwenImageEditInpaintPipeline", "inpaint"),
                                                     ("QwenImage21Pipeline", "generate")])
def test_the_warm_up_renders_what_the_model_is_for(models: dict[str, Path], pipeline: str, operation: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    renderer = loaded(models, pipeline)
    rendered: list[str] = []
    real = renderer.render

    def spy(request: RenderRequest, *args: Any, **kwargs: Any) -> list[Image.Image]:
        rendered.append(request.operation)
        return real(request, *args, **kwargs)

    monkeypatch.setattr(renderer, "render", spy)
    renderer.warmup()
    assert rendered == [operation]


# -- previews, tiles, LoRAs per class ---------------------------------------------------------------


@pytest.mark.parametrize(("pipeline", "operation"), [("QwenImagePipeline", "generate"),
                                                     ("QwenImageEditInpaintPipeline", "inpaint"),
                                                     ("QwenImage21Pipeline", "edit")])
def test_previews_come_from_each_classs_latents(models: dict[str, Path], pipeline: str, operation: str) -> None:
    seen: list[tuple[int, Image.Image]] = []
    case = CASES[operation][0]
    loaded(models, pipeline).render(RenderRequest(**{**case.__dict__, "steps": 3}),
                                    previews=Previews(1, lambda step, image: seen.append((step, image))))
    assert [step for step, _ in seen] == [1, 2]  # not on the last step
    assert all(max(image.size) == 128 and _picture(image) for _, image in seen)


def test_a_preview_of_latents_laid_out_otherwise_is_none_not_garbage() -> None:
    """The renderer passes its class's layout (2x2-packed or not) and its VAE's channels; latents
    that do not match them give no preview. The tiny models' sizes: Qwen-Image 4 channels packed
    2x2 (16 per token), 2.1 8 channels unpacked."""
    qwen_image = torch.randn(1, 4 * 3, 4 * 4)  # 64x48 px: 4x3 tokens
    qwen_21 = torch.randn(1, 4 * 3, 8)
    assert latent_preview(qwen_image, 64, 48, packing=2, latent_channels=4) is not None
    assert latent_preview(qwen_21, 64, 48, packing=1, latent_channels=8) is not None
    assert latent_preview(qwen_21, 64, 48, packing=2, latent_channels=4) is None
    assert latent_preview(qwen_image, 64, 48, packing=1, latent_channels=8) is None
    assert latent_preview(qwen_image, 64, 64, packing=2) is None  # not that many tokens


@pytest.mark.parametrize("pipeline", TINY_PIPELINES)
def test_the_tiled_vae_switches_on_and_back_for_each_class(models: dict[str, Path], pipeline: str) -> None:
    renderer = loaded(models, pipeline)
    vae = renderer.pipe.vae
    assert not getattr(vae, "use_tiling", False)
    with renderer.tiled_vae():
        assert vae.use_tiling
    assert not vae.use_tiling


@pytest.mark.parametrize(("pipeline", "operation"), [("QwenImagePipeline", "generate"),
                                                     ("QwenImageEditInpaintPipeline", "inpaint"),
                                                     ("QwenImage21Pipeline", "generate")])
def test_a_per_request_lora_applies_and_leaves_the_base_model(models: dict[str, Path], pipeline: str, operation: str,
                                                              tmp_path: Path) -> None:
    # the tiny LoRA targets the attention projections; 2.1's tiny blocks have them at the same
    # width (2 heads of 16), so it loads there too (a real one would be trained for 2.1)
    lora = str(write_tiny_lora(tmp_path, seed=5))
    renderer = loaded(models, pipeline)
    case = CASES[operation][0]
    base = np.asarray(renderer.render(case)[0], dtype=np.int16)
    with_lora = np.asarray(renderer.render(RenderRequest(**{**case.__dict__, "loras": [(lora, 1.5)]}))[0], np.int16)
    assert np.abs(with_lora - base).max() > 0
    assert np.array_equal(np.asarray(renderer.render(case)[0], dtype=np.int16), base)


# -- a catalog entry's load options ---------------------------------------------------------------


def spec(models: dict[str, Path], pipeline: str = "QwenImagePipeline", **fields: Any) -> ModelSpec:
    operations = tuple(op for op in Operation if op in PIPELINE_OPERATIONS[pipeline])
    return ModelSpec(name="tiny", source=str(models[pipeline]), pipeline=pipeline, operations=operations,
                     **fields)


def _psnr_db(a: Image.Image, b: Image.Image) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def test_a_spec_fuses_its_loras_and_sets_its_scheduler(models: dict[str, Path], tmp_path: Path) -> None:
    lora = str(write_tiny_lora(tmp_path, seed=5))
    fused = spec(models, fuse_loras=(FusedLora(uri=lora, scale=0.8),))
    options = load_options(WorkerSettings(), fused)
    assert options["pipeline"] == "QwenImagePipeline" and options["preset"].fuse_loras == ((lora, 0.8),)
    renderer: Any = load_renderer(fused.source, "cpu", **options)
    assert type(renderer.pipe).__name__ == "QwenImagePipeline"
    assert renderer.pipe.get_list_adapters() == {}  # merged into the weights, adapters gone
    case = CASES["generate"][0]
    plain = loaded(models, "QwenImagePipeline")
    per_request = plain.render(RenderRequest(**{**case.__dict__, "loras": [(lora, 0.8)]}))[0]
    image = renderer.render(case)[0]
    assert _psnr_db(image, per_request) >= 40  # what the same LoRA renders per request ...
    assert _psnr_db(image, plain.render(case)[0]) < 99  # ... and not the plain model

    scheduled = spec(models, defaults=ModelDefaults(steps=8, scheduler={"base_shift": 0.7, "max_shift": 1.0}))
    renderer = load_renderer(scheduled.source, "cpu", **load_options(WorkerSettings(), scheduled))
    for kind in ("generate", "inpaint", "img2img"):
        config = renderer.pipeline(kind).scheduler.config  # type: ignore[attr-defined]
        assert (config.base_shift, config.max_shift) == (0.7, 1.0), kind
    # 2 steps end at shift_terminal whatever the shift: 4 show it
    four = RenderRequest(**{**case.__dict__, "steps": 4})
    assert _psnr_db(renderer.render(four)[0], plain.render(four)[0]) < 99  # the shift changed the sigmas


def test_the_worker_settings_apply_on_top_of_the_spec(models: dict[str, Path], tmp_path: Path) -> None:
    one, two = str(write_tiny_lora(tmp_path, seed=1, name="one")), str(write_tiny_lora(tmp_path, seed=2, name="two"))
    entry = spec(models, defaults=ModelDefaults(scheduler={"base_shift": 0.7, "max_shift": 1.0}),
                 fuse_loras=(FusedLora(uri=one, scale=1.0),), profile="fp8-storage")
    options = load_options(WorkerSettings(scheduler_overrides='{"base_shift": 0.6}', fuse_loras=f"{two}:0.5"), entry)
    assert options["preset"].scheduler == {"base_shift": 0.6, "max_shift": 1.0}  # the setting's value wins
    assert options["preset"].fuse_loras == ((one, 1.0), (two, 0.5))  # the entry's first, then the setting's
    assert options["profile"].name == "fp8-storage"  # EDITFARM_PROFILE not set: the entry's
    assert load_options(WorkerSettings(profile="bf16"), entry)["profile"].name == "bf16"  # set: it wins
    assert options["operations"] == ("generate", "inpaint", "outpaint", "move", "upscale")


def test_a_remote_fused_lora_is_fetched_and_a_failing_one_stops_the_load(models: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    local = str(write_tiny_lora(tmp_path, seed=5))
    entry = spec(models, fuse_loras=(FusedLora(uri="s3://models/lightning.safetensors", scale=1.0),
                                     FusedLora(uri=local, scale=0.5)))
    asked: list[str] = []

    def fetch(uri: str) -> str:
        asked.append(uri)
        return local
    assert load_options(WorkerSettings(), entry, fetch_lora=fetch)["preset"].fuse_loras == ((local, 1.0), (local, 0.5))
    assert asked == ["s3://models/lightning.safetensors", local]
    fetcher = fused_lora_fetcher(WorkerSettings())
    assert fetcher(local) == local  # a local file as it is
    with pytest.raises(PresetError, match="cannot be fetched"):  # loopback is refused by the URL policy
        fetcher("https://127.0.0.1:9/lightning.safetensors")


def test_the_services_load_a_spec_as_its_class_and_editfarm_model_alone_as_the_edit_model(
        models: dict[str, Path]) -> None:
    from workers.services import load_renderer as worker_load

    renderer: Any = worker_load(WorkerSettings(), "cpu", spec(models, "QwenImage21Pipeline"))
    assert type(renderer.pipe).__name__ == "QwenImage21Pipeline" and renderer.operations == ("edit", "generate")
    alone: Any = worker_load(WorkerSettings(model=str(models["QwenImageEditPipeline"])), "cpu")
    assert type(alone.pipe).__name__ == "QwenImageEditPipeline" and alone.operations == OPERATIONS
