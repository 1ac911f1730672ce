"""Memory profiles and fast presets on the tiny random-weight model, on the CPU.

The model has 4 transformer blocks (the profiles treat the first and last apart). On the CPU
there is no second device: the offload profiles are loaded with ``allow_offload_on_cpu`` to
check that rendering through diffusers' group-offload hooks works and that the hooks are
installed with the right devices; that the weights leave the card between calls can only be
checked on a GPU (``test_offloaded_weights_stay_off_the_card_between_calls``, skipped here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from workers.pipeline import MoveSpec, OutpaintSpec, RenderRequest, UpscaleSpec, parse_profile
from workers.pipeline.diffusers_renderer import DiffusersRenderer
from workers.pipeline.presets import FastPreset, PresetError
from workers.pipeline.profiles import ProfileError

# the stated bound: on the tiny model fp8-storage measures ~65 dB against the bf16 profile
MIN_PSNR_DB = 40.0

IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8))


def request(operation: str, **fields: Any) -> RenderRequest:
    base: dict[str, Any] = {"operation": operation, "prompt": "a red ball", "negative_prompt": None, "steps": 2,
                            "true_cfg_scale": 1.0, "seed": 11, "images": [IMAGE]}
    base.update(fields)
    return RenderRequest(**base)


GENERATE = request("generate", images=[], width=64, height=48, steps=4)
EVERY_OPERATION = {
    "edit": (request("edit", width=64, height=48, true_cfg_scale=2.0), (64, 48)),
    "generate": (GENERATE, (64, 48)),
    "inpaint": (request("inpaint", boxes=[(0.25, 0.25, 0.6, 0.75)], strength=0.5), (64, 48)),
    "outpaint": (request("outpaint", outpaint=OutpaintSpec(left=16)), (80, 48)),
    "move": (request("move", move=MoveSpec(box=(0.1, 0.2, 0.4, 0.6), dx=8)), (64, 48)),
    "upscale": (request("upscale", width=128, height=96, strength=0.5, upscale=UpscaleSpec(tile=64, overlap=16)),
                (128, 96)),
}


def psnr_db(a: Image.Image, b: Image.Image) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> str:
    from workers.pipeline.tiny import build_tiny_edit_model

    return str(build_tiny_edit_model(tmp_path_factory.mktemp("models") / "tiny4", num_layers=4))


_loaded: dict[tuple[str, str, str], DiffusersRenderer] = {}


def load(model: str, profile: str, dtype: str = "fp32", preset: FastPreset | None = None) -> DiffusersRenderer:
    key = (model, profile, dtype)
    if preset is not None:
        return DiffusersRenderer.load(model, "cpu", dtype, profile=parse_profile(profile), preset=preset,
                                      allow_offload_on_cpu=True)
    if key not in _loaded:
        _loaded[key] = DiffusersRenderer.load(model, "cpu", dtype, profile=parse_profile(profile),
                                              allow_offload_on_cpu=True)
    return _loaded[key]


@pytest.fixture(scope="module")
def baseline(tiny4: str) -> Image.Image:
    return load(tiny4, "bf16").render(GENERATE)[0]


# -- every profile renders ---------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["fp8-storage+offload-text-encoder+offload", "int8", "fp8"])
def test_a_profile_renders_every_operation(tiny4: str, profile: str) -> None:
    # together these three cover every part: float8 storage, both offloads, both torchao formats
    renderer = load(tiny4, profile)
    renderer.healthcheck()
    for name, (case, size) in EVERY_OPERATION.items():
        images = renderer.render(case)
        assert [image.size for image in images] == [size], name
        assert np.asarray(images[0]).std() > 1, name  # not a flat (black/NaN) image


@pytest.mark.parametrize("profile", ["fp8-storage", "int8", "fp8", "offload-text-encoder", "offload",
                                     "fp8-storage+offload-text-encoder"])
def test_a_profile_stays_close_to_the_plain_model(tiny4: str, baseline: Image.Image, profile: str) -> None:
    image = load(tiny4, profile).render(GENERATE)[0]
    db = psnr_db(image, baseline)
    assert db >= MIN_PSNR_DB, f"{profile}: {db:.1f} dB"
    if "fp8" not in profile and "int8" not in profile:
        assert db == 99.0  # offloading moves weights, it does not change them


# -- fp8-storage -----------------------------------------------------------------------------------

def _block_linears(renderer: DiffusersRenderer, blocks: range) -> list[torch.nn.Linear]:
    transformer = renderer.pipe.transformer
    return [m for i in blocks for m in transformer.transformer_blocks[i].modules() if isinstance(m, torch.nn.Linear)]


def test_fp8_storage_stores_the_large_linears_in_float8(tiny4: str) -> None:
    bf16 = load(tiny4, "bf16", dtype="bf16")
    fp8 = load(tiny4, "fp8-storage", dtype="bf16")
    for kind in ("edit_plus", "generate", "inpaint", "img2img"):
        fp8.pipeline(kind)  # making the other pipelines must not cast the shared weights back
    inner = range(1, 3)  # blocks 0 and 3 (first and last) stay in bf16
    stored = _block_linears(fp8, inner)
    assert stored and {m.weight.dtype for m in stored} == {torch.float8_e4m3fn}
    fp8_bytes = sum(m.weight.numel() * m.weight.element_size() for m in stored)
    bf16_bytes = sum(m.weight.numel() * m.weight.element_size() for m in _block_linears(bf16, inner))
    assert bf16_bytes / fp8_bytes >= 1.9
    kept = _block_linears(fp8, range(0, 1)) + _block_linears(fp8, range(3, 4))
    assert {m.weight.dtype for m in kept} == {torch.bfloat16}
    transformer = fp8.pipe.transformer
    for name, parameter in transformer.named_parameters():
        if "norm" in name or name.startswith(("img_in", "txt_in", "time_text_embed", "proj_out")):
            assert parameter.dtype == torch.bfloat16, name


def test_fp8_storage_output_stays_within_the_stated_psnr(tiny4: str) -> None:
    plain = load(tiny4, "bf16", dtype="bf16").render(GENERATE)[0]
    fp8 = load(tiny4, "fp8-storage", dtype="bf16").render(GENERATE)[0]
    assert MIN_PSNR_DB <= psnr_db(fp8, plain) < 99.0  # close, and not a silently ignored profile


def test_int8_and_fp8_are_torchao_weight_only(tiny4: str) -> None:
    for profile, tensor in (("int8", "Int8Tensor"), ("fp8", "Float8Tensor")):
        weights = {type(m.weight).__name__ for m in _block_linears(load(tiny4, profile), range(1, 3))}
        assert weights == {tensor}, profile


# -- offload ------------------------------------------------------------------------------------------

def test_offload_installs_group_offload_hooks_with_their_devices(tiny4: str) -> None:
    from diffusers.hooks import HookRegistry

    renderer = load(tiny4, "offload-text-encoder+offload")
    renderer.render(GENERATE)
    for module in (renderer.pipe.transformer, renderer.pipe.text_encoder):
        hooks = [HookRegistry.check_if_exists_or_initialize(m).get_hook("group_offloading")
                 for m in module.modules()]
        groups = [h.group for h in hooks if h is not None]
        assert groups, type(module).__name__
        assert {str(g.onload_device) for g in groups} == {"cpu"} == {str(g.offload_device) for g in groups}
        assert not any(g.record_stream for g in groups)
    # the VAE is not offloaded
    assert HookRegistry.check_if_exists_or_initialize(renderer.pipe.vae).get_hook("group_offloading") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on the CPU host memory is the device")
def test_offloaded_weights_stay_off_the_card_between_calls(tiny4: str) -> None:
    renderer = DiffusersRenderer.load(tiny4, "cuda", profile=parse_profile("offload-text-encoder+offload"))
    renderer.render(GENERATE)
    for module in (renderer.pipe.transformer.transformer_blocks, renderer.pipe.text_encoder):
        assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert next(renderer.pipe.vae.parameters()).device.type == "cuda"


def test_a_profile_the_device_cannot_do_is_refused_before_loading(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "no-model")  # refused before the load would fail on this
    with pytest.raises(ProfileError, match="renders on the CPU"):
        DiffusersRenderer.load(missing, "cpu", profile=parse_profile("offload"))
    monkeypatch.setattr("workers.pipeline.profiles.torchao_available", lambda: False)
    monkeypatch.setattr("workers.pipeline.memory.torchao_available", lambda: False)
    from workers.pipeline.memory import apply_profile

    with pytest.raises(ProfileError, match="needs torchao"):
        apply_profile(object(), parse_profile("int8"), "cpu", torch.float32)


def test_a_per_request_lora_works_on_float8_storage(tiny4: str, tmp_path: Path) -> None:
    from workers.pipeline.tiny import write_tiny_lora

    lora = str(write_tiny_lora(tmp_path, seed=5))
    with_lora = RenderRequest(**{**GENERATE.__dict__, "loras": [(lora, 0.8)]})
    plain = load(tiny4, "bf16").render(with_lora)[0]
    assert psnr_db(load(tiny4, "fp8-storage").render(with_lora)[0], plain) >= MIN_PSNR_DB


# -- presets ----------------------------------------------------------------------------------------

def test_a_fused_lora_renders_what_the_same_lora_per_request_renders(tiny4: str, tmp_path: Path) -> None:
    from workers.pipeline.tiny import write_tiny_lora

    lora = str(write_tiny_lora(tmp_path, seed=5))
    per_request = load(tiny4, "bf16").render(RenderRequest(**{**GENERATE.__dict__, "loras": [(lora, 0.8)]}))[0]
    fused = load(tiny4, "bf16", preset=FastPreset(fuse_loras=((lora, 0.8),)))
    assert fused.pipe.get_list_adapters() == {}  # merged into the weights, adapters gone
    image = fused.render(GENERATE)[0]
    assert psnr_db(image, per_request) >= MIN_PSNR_DB
    assert psnr_db(image, load(tiny4, "bf16").render(GENERATE)[0]) < 99.0  # the LoRA did something


def test_scheduler_overrides_reach_every_pipeline(tiny4: str) -> None:
    renderer = load(tiny4, "bf16", preset=FastPreset(scheduler={"base_shift": 0.7}))
    assert renderer.pipeline("generate").scheduler.config.base_shift == 0.7
    with pytest.raises(PresetError, match="not settings of"):
        load(tiny4, "bf16", preset=FastPreset(scheduler={"warp": 1}))


def test_the_first_block_cache_renders_and_its_threshold_matters(tiny4: str) -> None:
    steps = RenderRequest(**{**GENERATE.__dict__, "steps": 8})
    plain = load(tiny4, "bf16").render(steps)[0]
    tight = load(tiny4, "bf16", preset=FastPreset(block_cache="first-block", block_cache_threshold=1e-9)).render(steps)[0]
    loose = load(tiny4, "bf16", preset=FastPreset(block_cache="first-block", block_cache_threshold=0.9)).render(steps)[0]
    assert psnr_db(tight, plain) >= 60  # nothing skipped: the same image up to float noise
    assert psnr_db(loose, plain) < psnr_db(tight, plain)  # blocks skipped: another image


def test_the_first_block_cache_needs_two_blocks(tiny_model: Path) -> None:
    with pytest.raises(PresetError, match="2 or more blocks"):
        DiffusersRenderer.load(str(tiny_model), "cpu", preset=FastPreset(block_cache="first-block"))


def test_a_compile_after_the_warm_up_is_counted() -> None:
    from workers.pipeline.compile_watch import CompileWatch

    seen: list[float] = []
    watch = CompileWatch(seen.append)
    try:
        module = torch.nn.Linear(4, 4)
        watch.watch_shapes(module)
        compiled = torch.compile(module, backend="eager")
        compiled(torch.ones(2, 4))  # the warm-up's shape
        watch.arm()
        assert watch.warmup_compiles >= 1 and watch.recompiles == 0
        compiled(torch.ones(2, 4))  # seen: no compile
        assert watch.recompiles == 0
        compiled(torch.ones(5, 4))  # a new shape: dynamo compiles again
        assert watch.recompiles >= 1 and len(seen) == watch.recompiles
        assert watch.last_shapes == ((5, 4),)
    finally:
        watch.close()


def test_the_worker_loads_its_model_with_the_profile_and_preset_of_its_settings(tiny4: str) -> None:
    from workers.pipeline import load_renderer
    from workers.render_setup import load_options
    from workers.settings import WorkerSettings

    options = load_options(WorkerSettings(profile="fp8-storage", block_cache="first-block", block_cache_threshold=0.1,
                                          scheduler_overrides='{"base_shift": 0.6}'))
    renderer: Any = load_renderer(tiny4, "cpu", **options)
    assert renderer.profile.name == "fp8-storage" and renderer.preset.name == "first-block(0.1)"
    assert renderer.pipe.transformer.transformer_blocks[1].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert renderer.pipe.transformer.is_cache_enabled
    assert renderer.pipe.scheduler.config.base_shift == 0.6
    renderer.healthcheck()
    assert renderer.render(GENERATE)[0].size == (64, 48)
