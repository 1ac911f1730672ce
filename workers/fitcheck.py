"""Does a memory profile fit this card? Estimated peak GPU memory per profile, and the check a
render worker makes before it loads anything.

The estimates are arithmetic on the architecture's sizes, not measurements of each profile
(only the bf16 total was measured, on an H200: 58.0 GiB ``torch.cuda.max_memory_allocated``
for a 1024² edit with the full-size architecture, ``bench/results-gpu-h200-8-50.json``):

* weights: 20.4 B-parameter MMDiT (60 blocks), 8.3 B-parameter Qwen2.5-VL text encoder
  (with its vision tower), 0.13 B-parameter VAE; 2 bytes per parameter in bf16;
* ``fp8-storage``: 1 byte per transformer parameter, except the first and last blocks
  (2 of 60) kept at 2 bytes; ``int8`` / ``fp8`` (torchao weight-only): 1 byte throughout;
* ``offload``: on the device only 2 transformer blocks at a time (the one computing and the
  one being prefetched) plus 0.5 % of the transformer outside the blocks;
* ``offload-text-encoder``: on the device only while encoding: its token embedding and output
  head (2 x 0.55 B parameters) plus 2 of its 28 decoder layers (0.23 B each);
* activations: the measured bf16 peak minus the bf16 weights (58.0 - 53.7 = 4.3 GiB at
  1024²), scaled with the output's pixel count above 1024² and never below it (an edit encodes
  its condition image at ~1 MP whatever the output size);
* 1.0 GiB for the CUDA context and allocator slack (outside ``max_memory_allocated``, but it
  takes the card's memory all the same).

The model's class matters where its sizes differ (``ARCHITECTURES``, keyed by the catalog's
``pipeline``):

* every Qwen-Image class (``QwenImagePipeline``, the edit, multi-image edit and edit inpaint
  ones) loads the same 20.4 B transformer, Qwen2.5-VL text encoder (its checkpoint carries the
  vision tower even where no image is read) and VAE: the same weights. The text-to-image one
  reads no condition image, so its activations follow the output's size below 1024² too
  instead of staying at the edit's ~1 MP floor (above it, the estimate is the edit's, which
  counts the condition image's tokens too: on the safe side);
* ``QwenImage21Pipeline`` (nothing measured): 7.1 B single-stream transformer (32 blocks) and
  0.34 B 16x VAE (the diffusers classes' default configs, parameters counted), an 8.8 B
  Qwen3-VL text encoder (the public 8B model its 4096-wide text input matches; 2 x 0.62 B
  embedding and head plus 0.19 B per decoder layer), and the Qwen-Image activations scaled by
  the transformer's width (4096 / 3072; one token per 16x16 px in both, condition images at
  ~1 MP too).

A profile "fits" when its estimate is at most the card's *free* memory as NVML reports it.
``python -m bench.profiles`` measures the real peaks on a GPU when one is available.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from workers.pipeline.profiles import MemoryProfile, ProfileError, all_profiles, parse_profile

__all__ = [
    "ARCHITECTURES",
    "CARD_CLASSES",
    "Architecture",
    "architecture_of",
    "EXIT_DOES_NOT_FIT",
    "CardMemory",
    "DoesNotFit",
    "check_fit",
    "estimate_peak_gib",
    "fitting_profiles",
    "startup_refusal",
]

GIB = 1024**3
# sysexits' EX_CONFIG: `editfarm worker --gpus` does not restart a worker that exits with it
EXIT_DOES_NOT_FIT = 78

TRANSFORMER_PARAMS = 20.4e9
TRANSFORMER_BLOCKS = 60
TEXT_ENCODER_PARAMS = 8.3e9
TEXT_ENCODER_ONLOADED_PARAMS = 2 * 0.545e9 + 2 * 0.233e9  # embedding + head + 2 decoder layers
VAE_PARAMS = 0.127e9
MEASURED_BF16_PEAK_GIB = 58.0  # H200, 1024² edit, bench/results-gpu-h200-8-50.json
REFERENCE_SIDE_PX = 1024
CONTEXT_GIB = 1.0
DEFAULT_PIPELINE = "QwenImageEditPipeline"


@dataclass(frozen=True)
class Architecture:
    """The sizes a model's estimate is made of (parameter counts; see the module docstring).

    Attributes:
        condition_floor: its renders encode a condition image at ~1 MP whatever the output's
            size, so activations never go below the reference's.
        activation_scale: its activations relative to the measured Qwen-Image edit's at the
            same output size.
    """

    transformer_params: float = TRANSFORMER_PARAMS
    transformer_blocks: int = TRANSFORMER_BLOCKS
    text_encoder_params: float = TEXT_ENCODER_PARAMS
    text_encoder_onloaded_params: float = TEXT_ENCODER_ONLOADED_PARAMS
    vae_params: float = VAE_PARAMS
    condition_floor: bool = True
    activation_scale: float = 1.0


QWEN_IMAGE_EDIT = Architecture()
QWEN_IMAGE = dataclasses.replace(QWEN_IMAGE_EDIT, condition_floor=False)
QWEN_IMAGE_21 = Architecture(transformer_params=7.12e9, transformer_blocks=32, text_encoder_params=8.8e9,
                             text_encoder_onloaded_params=2 * 0.62e9 + 2 * 0.19e9, vae_params=0.34e9,
                             activation_scale=4096 / 3072)
# The architecture of each pipeline class the catalog knows (broker/catalog.py KNOWN_PIPELINES).
ARCHITECTURES: Mapping[str, Architecture] = types.MappingProxyType({
    "QwenImagePipeline": QWEN_IMAGE,
    "QwenImageEditPipeline": QWEN_IMAGE_EDIT,
    "QwenImageEditPlusPipeline": QWEN_IMAGE_EDIT,
    "QwenImageEditInpaintPipeline": QWEN_IMAGE_EDIT,
    "QwenImage21Pipeline": QWEN_IMAGE_21,
})


def architecture_of(pipeline: str) -> Architecture:
    """The sizes of a model loaded as ``pipeline``.

    Raises:
        ValueError: no estimate for that class.
    """
    try:
        return ARCHITECTURES[pipeline]
    except KeyError:
        raise ValueError(f"no memory estimate for pipeline {pipeline!r}; known: {', '.join(ARCHITECTURES)}") from None

# nvidia-smi's memory.total of common cards (GiB), for the README's "fits" column
CARD_CLASSES: tuple[tuple[str, float], ...] = (
    ("24 GB (A10, L4, RTX 4090)", 22.5),
    ("32 GB (RTX 5090)", 31.8),
    ("40 GB (A100-40GB)", 39.4),
    ("48 GB (L40S, RTX 6000 Ada)", 45.0),
    ("80 GB (A100-80GB, H100)", 79.2),
    ("141 GB (H200)", 139.8),
)


def _gib(params: float, bytes_per_param: float) -> float:
    return params * bytes_per_param / GIB


def _transformer_bytes_per_param(profile: MemoryProfile, arch: Architecture) -> float:
    if profile.weights == "fp8-storage":
        kept = 2 / arch.transformer_blocks
        return (1 - kept) * 1 + kept * 2
    if profile.weights in ("int8", "fp8"):
        return 1.0
    return 2.0


def _activations_gib(max_side_px: int, arch: Architecture) -> float:
    bf16_weights = _gib(TRANSFORMER_PARAMS + TEXT_ENCODER_PARAMS + VAE_PARAMS, 2)
    at_reference = MEASURED_BF16_PEAK_GIB - bf16_weights
    area = (max_side_px / REFERENCE_SIDE_PX) ** 2
    return at_reference * arch.activation_scale * (max(1.0, area) if arch.condition_floor else area)


def estimate_peak_gib(profile: MemoryProfile, max_side_px: int = REFERENCE_SIDE_PX, *,
                      pipeline: str = DEFAULT_PIPELINE) -> float:
    """Estimated peak GPU memory (GiB, CUDA context included) of a ``max_side_px`` render with
    ``profile`` by a model loaded as ``pipeline`` (see the module docstring for where each term
    comes from).

    Raises:
        ValueError: no estimate for ``pipeline``.
    """
    arch = architecture_of(pipeline)
    per_param = _transformer_bytes_per_param(profile, arch)
    if profile.offload:
        block = arch.transformer_params / arch.transformer_blocks
        transformer = _gib(2 * block, per_param) + _gib(0.005 * arch.transformer_params, 2)
    else:
        transformer = _gib(arch.transformer_params, per_param)
    resident = CONTEXT_GIB + transformer + _gib(arch.vae_params, 2)
    activations = _activations_gib(max_side_px, arch)
    if profile.offload_text_encoder:
        # the text encoder's onloaded part and the denoising activations are never live together
        return resident + max(_gib(arch.text_encoder_onloaded_params, 2), activations)
    return resident + _gib(arch.text_encoder_params, 2) + activations


def fitting_profiles(free_gib: float, max_side_px: int = REFERENCE_SIDE_PX,
                     usable: Callable[[MemoryProfile], bool] = lambda _: True, *,
                     pipeline: str = DEFAULT_PIPELINE) -> list[MemoryProfile]:
    """The profiles whose estimate fits in ``free_gib``, fastest first: no offloading before
    offloading the text encoder (once per job) before offloading the transformer (every step),
    and within that, the least compressed first. ``usable`` filters out what this installation
    cannot do (e.g. torchao missing)."""
    def need(p: MemoryProfile) -> float:
        return estimate_peak_gib(p, max_side_px, pipeline=pipeline)

    fits = [p for p in all_profiles() if usable(p) and need(p) <= free_gib]
    return sorted(fits, key=lambda p: (p.offload, p.offload_text_encoder, -need(p)))


@dataclass(frozen=True)
class CardMemory:
    """One card's memory as NVML / nvidia-smi report it (bytes)."""

    name: str
    total_bytes: int
    free_bytes: int


class DoesNotFit(RuntimeError):
    """The profile's estimated peak exceeds the card's free memory. The message names the card,
    both numbers and the profiles that would fit (or says none does)."""


def check_fit(profile: MemoryProfile, card: CardMemory, max_side_px: int = REFERENCE_SIDE_PX,
              usable: Callable[[MemoryProfile], bool] = lambda _: True, *,
              pipeline: str = DEFAULT_PIPELINE) -> None:
    """Raises:
        DoesNotFit: ``profile``'s estimated peak for a ``pipeline`` model is more than ``card``'s
            free memory.
        ValueError: no estimate for ``pipeline``.
    """
    need = estimate_peak_gib(profile, max_side_px, pipeline=pipeline)
    free = card.free_bytes / GIB
    if need <= free:
        return
    fits = fitting_profiles(free, max_side_px, usable, pipeline=pipeline)
    advice = ("profiles that would fit: " + ", ".join(p.name for p in fits)) if fits \
        else "no profile fits; free memory on the card or use a larger card"
    model = "" if pipeline == DEFAULT_PIPELINE else f" of a {pipeline} model"
    raise DoesNotFit(
        f"profile {profile.name!r} needs ~{need:.1f} GiB for {max_side_px}px renders{model} (estimate), but "
        f"{card.name} has {free:.1f} GiB free of {card.total_bytes / GIB:.1f} GiB; {advice} "
        "(set EDITFARM_PROFILE)"
    )


def startup_refusal(profile_name: str, device: str, read_card: Callable[[], CardMemory | None],
                    max_side_px: int = REFERENCE_SIDE_PX,
                    usable: Callable[[MemoryProfile], bool] = lambda _: True, *,
                    pipeline: str = DEFAULT_PIPELINE) -> str | None:
    """Why a render worker must not start with ``profile_name`` on ``device`` ("cpu", "cuda",
    "cuda:N" or "auto") for a model loaded as ``pipeline``, or None when it may. Reads the card
    with ``read_card`` (NVML or nvidia-smi: never CUDA, so it is safe in the Celery parent); no
    card ("auto" without a GPU, or "cpu") checks only that the profile can run on the CPU.
    """
    try:
        profile = parse_profile(profile_name)
        if not usable(profile):
            raise ProfileError(f"profile {profile.name!r} needs torchao, which is not installed")
        card = None if device == "cpu" else read_card()
        if card is None:
            if device.startswith("cuda"):
                return "EDITFARM_DEVICE asks for CUDA but no GPU is visible to NVML/nvidia-smi"
            profile.check_device("cpu")
            return None
        check_fit(profile, card, max_side_px, usable, pipeline=pipeline)
    except (ValueError, DoesNotFit) as exc:  # ProfileError, or no estimate for the pipeline
        return str(exc)
    return None
