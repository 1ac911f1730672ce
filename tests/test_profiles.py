"""Memory profiles, fast presets and the fit check as plain data (no model, no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.catalog import ModelSpec
from broker.schema import Operation
from workers import render_setup
from workers.card_memory import parse_smi_line, read_card_memory, visible_card
from workers.fitcheck import (
    EXIT_DOES_NOT_FIT,
    CardMemory,
    DoesNotFit,
    check_fit,
    estimate_peak_gib,
    fitting_profiles,
    startup_refusal,
)
from workers.pipeline.presets import FastPreset, PresetError, parse_fuse_loras, parse_sizes
from workers.pipeline.profiles import MemoryProfile, ProfileError, all_profiles, parse_profile
from workers.settings import WorkerSettings

MIB = 1024**2
# what nvidia-smi reports for an A10 (24 GB class) with nothing else on it, and for an RTX 5090
A10 = CardMemory(name="NVIDIA A10", total_bytes=23028 * MIB, free_bytes=22731 * MIB)
RTX_5090 = CardMemory(name="NVIDIA GeForce RTX 5090", total_bytes=32607 * MIB, free_bytes=32120 * MIB)
H100 = CardMemory(name="NVIDIA H100 80GB HBM3", total_bytes=81559 * MIB, free_bytes=81008 * MIB)
A100_40 = CardMemory(name="NVIDIA A100-SXM4-40GB", total_bytes=40960 * MIB, free_bytes=40337 * MIB)


# -- profiles --------------------------------------------------------------------------------------

def test_a_profile_parses_in_any_order_to_its_canonical_name() -> None:
    profile = parse_profile("Offload-Text-Encoder + fp8-storage")
    assert profile == MemoryProfile(weights="fp8-storage", offload_text_encoder=True)
    assert profile.name == "fp8-storage+offload-text-encoder"
    assert parse_profile("bf16") == MemoryProfile()


def test_every_profile_round_trips_through_its_name() -> None:
    profiles = all_profiles()
    assert len({p.name for p in profiles}) == len(profiles) == 16
    assert all(parse_profile(p.name) == p for p in profiles)


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"), ("fp8-storage+", "empty"), ("fp4", "unknown"), ("offload+offload", "twice"),
    ("bf16+offload", "combines with nothing"), ("fp8-storage+int8", "two weight formats"),
])
def test_a_malformed_profile_is_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ProfileError, match=says):
        parse_profile(text)


def test_offloading_on_the_cpu_is_refused_not_ignored() -> None:
    with pytest.raises(ProfileError, match="renders on the CPU") as caught:
        parse_profile("fp8-storage+offload").check_device("cpu")
    assert "'fp8-storage'" in str(caught.value)  # names what would work there
    parse_profile("fp8-storage+offload").check_device("cuda")
    parse_profile("fp8-storage").check_device("cpu")  # float8 storage is cast up in software on the CPU


# -- presets ---------------------------------------------------------------------------------------

def test_preset_settings_parse() -> None:
    preset = FastPreset.parse(fuse_loras="/m/lightning.safetensors:1.0, /m/style.safetensors",
                              scheduler_overrides='{"shift": 3.0}', block_cache="First-Block",
                              block_cache_threshold=0.1, compile=True, warmup_sizes="1024x1024, 768x1344")
    assert preset.fuse_loras == (("/m/lightning.safetensors", 1.0), ("/m/style.safetensors", 1.0))
    assert preset.scheduler == {"shift": 3.0}
    assert preset.warmup_sizes == ((1024, 1024), (768, 1344))
    assert preset.name == "fused-lora+first-block(0.1)+compile"
    assert FastPreset().name == "plain"
    assert parse_fuse_loras("c:/odd:name.safetensors") == (("c:/odd:name.safetensors", 1.0),)


@pytest.mark.parametrize("fields", [
    {"block_cache": "mag"}, {"block_cache": "teacache"}, {"block_cache_threshold": 0.0},
    {"scheduler_overrides": "[1]"}, {"scheduler_overrides": "{bad"}, {"warmup_sizes": "1000x1000"},
    {"warmup_sizes": "big"}, {"fuse_loras": ":0.5"},
])
def test_a_malformed_preset_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(PresetError):
        FastPreset.parse(**fields)  # type: ignore[arg-type]


def test_sizes_are_multiples_of_16() -> None:
    assert parse_sizes("") == ()
    with pytest.raises(PresetError, match="multiples of 16"):
        parse_sizes("1024x1000")


# -- the fit check ---------------------------------------------------------------------------------

def test_the_estimates_order_the_profiles_by_what_they_keep_on_the_card() -> None:
    bf16 = estimate_peak_gib(parse_profile("bf16"))
    assert 57 < bf16 < 61  # anchored on the measured 58.0 GiB (+1 GiB context)
    assert estimate_peak_gib(parse_profile("fp8-storage")) < bf16 - 15
    assert estimate_peak_gib(parse_profile("fp8-storage+offload-text-encoder")) < estimate_peak_gib(
        parse_profile("fp8-storage"))
    assert estimate_peak_gib(parse_profile("bf16"), 1328) > bf16  # larger outputs need more


def test_a_24gb_card_refuses_bf16_and_names_the_profiles_that_fit() -> None:
    with pytest.raises(DoesNotFit) as caught:
        check_fit(parse_profile("bf16"), A10)
    message = str(caught.value)
    assert "'bf16' needs ~59" in message and "NVIDIA A10 has 22.2 GiB free" in message
    named = message.split("profiles that would fit: ")[1].split(" (set EDITFARM_PROFILE)")[0].split(", ")
    assert "fp8-storage+offload" in named
    assert named == [p.name for p in fitting_profiles(A10.free_bytes / 1024**3)]
    assert "bf16" not in named and "fp8-storage" not in named
    # and the ones it names do pass the check
    for name in named:
        check_fit(parse_profile(name), A10)


def test_a_32gb_card_takes_fp8_storage_with_the_text_encoder_offloaded() -> None:
    check_fit(parse_profile("fp8-storage+offload-text-encoder"), RTX_5090)
    with pytest.raises(DoesNotFit):
        check_fit(parse_profile("fp8-storage"), RTX_5090)


def test_an_80gb_card_takes_bf16() -> None:
    check_fit(parse_profile("bf16"), H100)


def test_a_busy_card_is_judged_by_its_free_memory() -> None:
    busy = CardMemory(name="NVIDIA H100 80GB HBM3", total_bytes=H100.total_bytes, free_bytes=30 * 1024 * MIB)
    with pytest.raises(DoesNotFit, match="30.0 GiB free of 79.6 GiB"):
        check_fit(parse_profile("bf16"), busy)


def test_the_estimate_follows_the_models_architecture() -> None:
    bf16 = parse_profile("bf16")
    edit = estimate_peak_gib(bf16)
    # the text-to-image checkpoint has the same weights; it reads no ~1 MP condition image
    assert estimate_peak_gib(bf16, pipeline="QwenImagePipeline") == edit
    assert estimate_peak_gib(bf16, 512, pipeline="QwenImagePipeline") < estimate_peak_gib(bf16, 512) == edit
    for same in ("QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"):
        assert estimate_peak_gib(bf16, pipeline=same) == edit
    qwen21 = estimate_peak_gib(bf16, pipeline="QwenImage21Pipeline")
    assert 30 < qwen21 < edit - 15  # a 7 B transformer instead of 20 B
    assert estimate_peak_gib(parse_profile("fp8-storage"), pipeline="QwenImage21Pipeline") < qwen21
    with pytest.raises(ValueError, match="no memory estimate"):
        estimate_peak_gib(bf16, pipeline="FluxPipeline")


def _spec(pipeline: str, **fields: object) -> ModelSpec:
    return ModelSpec(name="m", source="/models/m", pipeline=pipeline, operations=(Operation.GENERATE,),
                     **fields)  # type: ignore[arg-type]


def test_the_worker_checks_the_fit_of_the_model_it_serves() -> None:
    settings = WorkerSettings(device="cuda")  # EDITFARM_PROFILE not set: bf16, or the entry's
    assert "profile 'bf16' needs ~59" in str(render_setup.refusal(settings, read_card=lambda: A100_40))
    assert render_setup.refusal(settings, read_card=lambda: A100_40, spec=_spec("QwenImage21Pipeline")) is None
    edit = _spec("QwenImageEditPipeline", profile="fp8-storage+offload-text-encoder")
    assert render_setup.refusal(settings, read_card=lambda: RTX_5090) is not None  # bf16
    assert render_setup.refusal(settings, read_card=lambda: RTX_5090, spec=edit) is None  # the entry's profile
    assert render_setup.profile_name(settings, edit) == "fp8-storage+offload-text-encoder"
    explicit = WorkerSettings(device="cuda", profile="bf16")
    assert render_setup.profile_name(explicit, edit) == "bf16"  # EDITFARM_PROFILE set: it wins
    refused = render_setup.refusal(explicit, read_card=lambda: A10, spec=_spec("QwenImage21Pipeline"))
    assert "of a QwenImage21Pipeline model (estimate)" in str(refused)
    unknown = render_setup.refusal(WorkerSettings(device="cpu"), spec=_spec("QwenImagePipeline", profile="fp4"))
    assert "unknown profile part" in str(unknown)


def test_startup_refusal_without_a_card() -> None:
    no_card = lambda: None  # noqa: E731
    assert startup_refusal("fp8-storage", "auto", no_card) is None  # a CPU host
    assert "renders on the CPU" in str(startup_refusal("offload", "auto", no_card))
    assert "no GPU is visible" in str(startup_refusal("bf16", "cuda", no_card))
    assert "unknown profile part" in str(startup_refusal("fp4", "cuda", lambda: H100))
    assert "needs torchao" in str(startup_refusal("int8", "cuda", lambda: H100, usable=lambda p: not p.needs_torchao))


def test_the_worker_refuses_through_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = WorkerSettings(profile="bf16", device="cuda")
    assert "profiles that would fit" in str(render_setup.refusal(settings, read_card=lambda: A10))
    assert render_setup.refusal(settings, read_card=lambda: H100) is None
    assert render_setup.refusal(WorkerSettings(profile="bf16", device="cuda", fit_check=False),
                                read_card=lambda: A10) is None

    def broken() -> CardMemory:
        raise subprocess.CalledProcessError(9, "nvidia-smi")
    assert "EDITFARM_FIT_CHECK=false" in str(render_setup.refusal(settings, read_card=broken))
    assert render_setup.refusal(WorkerSettings(profile="bf16", device="auto"), read_card=broken) is None
    monkeypatch.setattr(render_setup, "read_card_memory", lambda: A10)
    with pytest.raises(SystemExit) as caught:
        render_setup.exit_if_unfit(settings)
    assert caught.value.code == EXIT_DOES_NOT_FIT


def test_card_memory_from_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_smi_line("NVIDIA A10, 23028, 22731") == A10
    calls: list[list[str]] = []

    def smi(argv: list[str]) -> str:
        calls.append(argv)
        return "NVIDIA A10, 23028, 22731\n"
    monkeypatch.setattr("workers.card_memory._from_nvml", lambda card: None)
    monkeypatch.setattr("workers.card_memory.shutil.which", lambda name: "/usr/bin/nvidia-smi")
    assert read_card_memory("3", run=smi) == A10
    assert calls[0][1:3] == ["-i", "3"]
    monkeypatch.setattr("workers.card_memory.shutil.which", lambda name: None)
    assert read_card_memory("3", run=smi) is None  # no NVML, no nvidia-smi: a CPU host
    assert visible_card({"CUDA_VISIBLE_DEVICES": "GPU-1234,GPU-5"}) == "GPU-1234"
    assert visible_card({}) == "0"


def test_a_render_worker_with_a_profile_it_cannot_run_exits_before_loading(tmp_path: Path) -> None:
    """A real `editfarm worker` process: refused in the Celery parent with the reason, exit 78
    (which `--gpus` does not restart), before any model or broker connection."""
    env = {"PATH": "/usr/bin:/bin", "EDITFARM_PROFILE": "fp8-storage+offload", "EDITFARM_MODEL": str(tmp_path),
           "EDITFARM_REDIS_URL": "redis://127.0.0.1:9/0", "EDITFARM_READY_FILE": str(tmp_path / "ready"),
           "EDITFARM_HEARTBEAT_FILE": str(tmp_path / "heartbeat"), "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "cli.main", "worker", "--gpus", "cpu"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == EXIT_DOES_NOT_FIT, done.stderr[-2000:]
    assert "not starting: profile 'fp8-storage+offload' offloads weights" in done.stderr
    assert not (tmp_path / "ready").exists()
