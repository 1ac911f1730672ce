"""Per-job LoRA adapters on the tiny model: applied for the job only, cached, and the base model
left exactly as it was for the next job."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers.pipeline import InvalidRequest, RenderRequest
from workers.pipeline.diffusers_renderer import DiffusersRenderer
from workers.pipeline.tiny import write_tiny_lora

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def renderer(tiny_model: Path) -> DiffusersRenderer:
    return DiffusersRenderer.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return write_tiny_lora(folder, seed=1, name="one"), write_tiny_lora(folder, seed=2, name="two")


def inpaint(loras: list[tuple[str, float]] | None = None) -> RenderRequest:
    return RenderRequest(operation="inpaint", prompt="a red ball", negative_prompt=None, steps=2,
                         true_cfg_scale=1.0, seed=3, images=[IMAGE], boxes=[(0.1, 0.1, 0.9, 0.9)],
                         loras=loras or [])


def generate(loras: list[tuple[str, float]] | None = None) -> RenderRequest:
    return RenderRequest(operation="generate", prompt="a red ball", negative_prompt=None, steps=2,
                         true_cfg_scale=1.0, seed=3, width=48, height=32, loras=loras or [])


def test_the_tiny_lora_is_a_diffusers_lora_file_for_the_tiny_transformer(lora_files: tuple[Path, Path]) -> None:
    from diffusers import QwenImagePipeline

    one, two = lora_files
    assert one.suffix == ".safetensors" and one.stat().st_size < 100_000
    state = QwenImagePipeline.lora_state_dict(str(one))
    keys = list(state[0] if isinstance(state, tuple) else state)
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert one.read_bytes() != two.read_bytes()
    again = write_tiny_lora(one.parent / "again", seed=1, name="one")
    assert again.read_bytes() == one.read_bytes()


def test_a_lora_changes_the_output_and_the_next_job_is_the_base_model_again(
    renderer: DiffusersRenderer, lora_files: tuple[Path, Path]
) -> None:
    for request in (inpaint, generate):
        before = renderer.render(request())[0].tobytes()
        with_lora = renderer.render(request([(str(lora_files[0]), 1.0)]))[0].tobytes()
        after = renderer.render(request())[0].tobytes()
        assert with_lora != before, request.__name__
        assert after == before, request.__name__


def test_lora_scales_and_combinations_each_give_their_own_deterministic_output(
    renderer: DiffusersRenderer, lora_files: tuple[Path, Path]
) -> None:
    one, two = str(lora_files[0]), str(lora_files[1])
    outputs = {}
    for name, loras in {"one": [(one, 1.0)], "one half": [(one, 0.5)], "both": [(one, 1.0), (two, 0.8)],
                        "two": [(two, 0.8)]}.items():
        outputs[name] = renderer.render(inpaint(loras))[0].tobytes()
        assert renderer.render(inpaint(loras))[0].tobytes() == outputs[name], name
    assert len(set(outputs.values())) == 4
    assert renderer.render(inpaint([(one, 0.5), (one, 0.5)]))[0].tobytes() == outputs["one"]  # scales add up


def test_loaded_adapters_are_cached_by_file_content(
    renderer: DiffusersRenderer, lora_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renderer.render(inpaint([(str(lora_files[0]), 1.0)]))
    loads: list[Any] = []
    real = renderer.pipe.load_lora_weights

    def counting(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(renderer.pipe, "load_lora_weights", counting)
    copy = tmp_path / "same-weights-elsewhere.safetensors"
    shutil.copyfile(lora_files[0], copy)
    renderer.render(inpaint([(str(lora_files[0]), 1.0)]))
    renderer.render(inpaint([(str(copy), 1.0)]))
    assert loads == []
    assert len(renderer.loras.loaded) == len(set(renderer.loras.loaded))


def test_the_cache_unloads_the_least_recently_used_adapter_beyond_its_capacity(
    tiny_model: Path, tmp_path: Path
) -> None:
    small = DiffusersRenderer.load(str(tiny_model), device="cpu", lora_capacity=4)
    base = small.render(generate())[0].tobytes()
    files = [write_tiny_lora(tmp_path, seed=10 + i, name=f"l{i}") for i in range(5)]
    for path in files:
        small.render(generate([(str(path), 1.0)]))
    assert len(small.loras.loaded) == 4
    assert sorted(small.pipe.get_list_adapters()["transformer"]) == sorted(small.loras.loaded)
    assert small.render(generate())[0].tobytes() == base


def test_a_bad_lora_file_is_an_invalid_request_and_leaves_the_model_usable(
    renderer: DiffusersRenderer, tmp_path: Path
) -> None:
    before = renderer.render(generate())[0].tobytes()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidRequest, match="does not fit"):
        renderer.render(generate([(str(junk), 1.0)]))
    with pytest.raises(InvalidRequest, match="cannot be read"):
        renderer.render(generate([(str(tmp_path / "missing.safetensors"), 1.0)]))
    assert renderer.render(generate())[0].tobytes() == before
