"""The pipeline adapter against a tiny random-weight Qwen-Image-Edit model built on the fly.

Everything runs on CPU with the real diffusers/transformers classes; one 2-step edit takes a
few seconds, dominated by the VAE working at ~1 MP whatever the input size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workers.pipeline import Previews, RenderInterrupted, RenderRequest, load_renderer
from workers.pipeline.diffusers_renderer import DiffusersRenderer, resolve_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.pipeline.tiny import build_tiny_edit_model

    return build_tiny_edit_model(tmp_path_factory.mktemp("tiny-edit") / "model", seed=0)


@pytest.fixture(scope="session")
def renderer(tiny_model_dir: Path) -> DiffusersRenderer:
    return DiffusersRenderer.load(str(tiny_model_dir), device="cpu")


def _input_image(width: int = 96, height: int = 64) -> Image.Image:
    """A deterministic noisy RGB image (3:2 by default)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _edit(
    seed: int = 1, steps: int = 2, num_images: int = 1, cfg: float = 4.0, size: tuple[int, int] | None = (96, 64)
) -> RenderRequest:
    """An edit of the 96x64 input; rendered at ``size`` (None: the pipeline's ~1 MP, whose VAE
    decode costs seconds on CPU, so only the tests about that size use it)."""
    return RenderRequest(
        operation="edit",
        prompt="make the sky purple",
        negative_prompt="blurry",
        steps=steps,
        true_cfg_scale=cfg,
        seed=seed,
        images=[_input_image()],
        num_images=num_images,
        width=None if size is None else size[0],
        height=None if size is None else size[1],
    )


@pytest.fixture(scope="session")
def first_edit(renderer: DiffusersRenderer) -> list[Image.Image]:
    return renderer.render(_edit(seed=1, size=None))


def test_tiny_model_folder_has_model_index_and_every_component(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"):
        assert name in index and (tiny_model_dir / name).is_dir()
    size = sum(f.stat().st_size for f in tiny_model_dir.rglob("*") if f.is_file())
    assert size < 10 * 2**20


def test_tiny_model_loads_back_with_plain_diffusers_from_pretrained(tiny_model_dir: Path) -> None:
    from diffusers import QwenImageEditPipeline

    pipe = QwenImageEditPipeline.from_pretrained(tiny_model_dir)
    assert type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(pipe.processor).__name__ == "Qwen2VLProcessor"
    text = pipe.text_encoder.config.text_config
    assert pipe.transformer.config.joint_attention_dim == text.hidden_size
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.z_dim
    assert pipe.vae_scale_factor == 8  # the real model's spatial compression
    assert pipe.scheduler.config.use_dynamic_shifting is True
    assert (
        pipe.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        == pipe.text_encoder.config.image_token_id
    )


def test_building_twice_with_the_same_seed_writes_identical_files(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from workers.pipeline.tiny import build_tiny_edit_model

    again = build_tiny_edit_model(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(tiny_model_dir) for p in tiny_model_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_model_dir / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_a_different_seed_builds_different_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    from workers.pipeline.tiny import build_tiny_edit_model

    other = build_tiny_edit_model(tmp_path / "other", seed=1)
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (tiny_model_dir / weights).read_bytes()


def test_an_edit_returns_rgb_images_of_about_one_megapixel_with_the_input_aspect(
    first_edit: list[Image.Image],
) -> None:
    assert len(first_edit) == 1
    image = first_edit[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    width, height = image.size
    assert width % 32 == 0 and height % 32 == 0
    assert 0.9e6 < width * height < 1.1e6
    assert math.isclose(width / height, 96 / 64, rel_tol=0.05)  # (1248, 832) today
    assert np.asarray(image).std() > 1.0  # not a NaN-turned-black frame


def test_the_same_seed_gives_byte_identical_images(
    renderer: DiffusersRenderer, first_edit: list[Image.Image]
) -> None:
    again = renderer.render(_edit(seed=1, size=None))
    assert again[0].tobytes() == first_edit[0].tobytes()


def test_a_different_seed_gives_a_different_image(renderer: DiffusersRenderer) -> None:
    one, other = renderer.render(_edit(seed=1)), renderer.render(_edit(seed=2))
    assert other[0].size == one[0].size == (96, 64)
    assert other[0].tobytes() != one[0].tobytes()


def test_on_step_is_called_after_each_step_with_one_based_counts(renderer: DiffusersRenderer) -> None:
    calls: list[tuple[int, int]] = []

    def on_step(done: int, total: int) -> bool:
        calls.append((done, total))
        return True

    renderer.render(_edit(cfg=1.0), on_step)
    assert calls == [(1, 2), (2, 2)]


def test_a_callback_returning_false_raises_render_interrupted(renderer: DiffusersRenderer) -> None:
    calls: list[tuple[int, int]] = []

    def cancel(done: int, total: int) -> bool:
        calls.append((done, total))
        return False

    with pytest.raises(RenderInterrupted) as info:
        renderer.render(_edit(cfg=1.0), cancel)
    assert calls == [(1, 2)]
    assert (info.value.steps_done, info.value.total_steps) == (1, 2)


def test_the_renderer_still_works_after_a_canceled_render(renderer: DiffusersRenderer) -> None:
    with pytest.raises(RenderInterrupted):
        renderer.render(_edit(seed=5, cfg=1.0), lambda done, total: False)
    calls: list[tuple[int, int]] = []

    def record(done: int, total: int) -> bool:
        calls.append((done, total))
        return True

    renderer.render(_edit(seed=5, cfg=1.0), record)
    assert calls == [(1, 2), (2, 2)]


def test_a_one_step_edit_is_refused_because_the_qwen_scheduler_would_return_nan(
    renderer: DiffusersRenderer,
) -> None:
    with pytest.raises(ValueError, match="at least 2 steps"):
        renderer.render(_edit(steps=1, cfg=1.0))


def test_num_images_returns_that_many_distinct_images(renderer: DiffusersRenderer) -> None:
    images = renderer.render(_edit(seed=3, cfg=1.0, num_images=2))
    assert len(images) == 2
    assert images[0].tobytes() != images[1].tobytes()


def test_non_rgb_inputs_are_converted_and_an_alpha_channel_is_kept(renderer: DiffusersRenderer) -> None:
    for mode, expected in (("RGBA", "RGBA"), ("L", "RGB")):
        request = RenderRequest(
            operation="edit",
            prompt="x",
            negative_prompt=None,
            steps=2,
            true_cfg_scale=1.0,
            seed=0,
            images=[_input_image().convert(mode)],
            width=96,
            height=64,
        )
        assert renderer.render(request)[0].mode == expected


def test_healthcheck_passes_on_cpu(renderer: DiffusersRenderer) -> None:
    renderer.healthcheck()
    assert renderer.device == "cpu" and renderer.dtype == torch.float32


def test_warmup_runs_a_short_render(renderer: DiffusersRenderer) -> None:
    renderer.warmup()


def test_load_renderer_returns_a_ready_renderer(tiny_model_dir: Path) -> None:
    loaded = load_renderer(str(tiny_model_dir), "cpu")
    assert isinstance(loaded, DiffusersRenderer)
    loaded.healthcheck()


def test_dtype_defaults_to_bf16_on_cuda_and_float32_elsewhere() -> None:
    assert resolve_dtype("cuda", None) == torch.bfloat16
    assert resolve_dtype("cuda:1", None) == torch.bfloat16
    assert resolve_dtype("cpu", None) == torch.float32
    assert resolve_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("cpu", "int8")


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 0},
        {"num_images": 0},
        {"seed": -1},
        {"seed": 2**64},
        {"operation": "paint"},
        {"num_images": 5},
        {"images": [_input_image()] * 5},
        {"images": []},
    ],
)
def test_render_request_rejects_out_of_range_values(change: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "operation": "edit",
        "prompt": "p",
        "negative_prompt": None,
        "steps": 2,
        "true_cfg_scale": 1.0,
        "seed": 0,
        "images": [_input_image()],
    }
    fields.update(change)
    with pytest.raises(ValueError):
        RenderRequest(**fields)  # type: ignore[arg-type]


def test_importing_the_package_neither_imports_diffusers_nor_probes_cuda() -> None:
    # A fresh interpreter: this test process has long imported diffusers. A CUDA probe in the
    # Celery parent before fork breaks CUDA in every render child (seen on an H200).
    probe = (
        "import sys, torch\n"
        "calls = []\n"
        "torch._C._cuda_getDeviceCount = lambda: calls.append(1) or 0\n"
        "import workers.pipeline, workers.pipeline.base, workers.pipeline.diffusers_renderer\n"
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules, 'imported'\n"
        "assert not calls, 'probed CUDA'\n"
        "import os; assert os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'] == '1', 'fork guard unset'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_previews_come_every_n_steps_as_small_images_and_stop_when_unset(renderer: DiffusersRenderer) -> None:
    seen: list[tuple[int, tuple[int, int]]] = []
    renderer.render(_edit(steps=5), previews=Previews(2, lambda step, image: seen.append((step, image.size))))
    assert [step for step, _ in seen] == [2, 4]  # never on the last step: the result follows at once
    assert all(max(size) <= 128 for _, size in seen)
    renderer.render(_edit(steps=2))
    assert len(seen) == 2
