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

A profile "fits" when its estimate is at most the card's *free* memory as NVML reports it.
``python -m bench.profiles`` measures the real peaks on a GPU when one is available.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from workers.pipeline.profiles import MemoryProfile, ProfileError, all_profiles, parse_profile

__all__ = [
    "CARD_CLASSES",
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


def _transformer_bytes_per_param(profile: MemoryProfile) -> float:
    if profile.weights == "fp8-storage":
        kept = 2 / TRANSFORMER_BLOCKS
        return (1 - kept) * 1 + kept * 2
    if profile.weights in ("int8", "fp8"):
        return 1.0
    return 2.0


def _activations_gib(max_side_px: int) -> float:
    bf16_weights = _gib(TRANSFORMER_PARAMS + TEXT_ENCODER_PARAMS + VAE_PARAMS, 2)
    at_reference = MEASURED_BF16_PEAK_GIB - bf16_weights
    return at_reference * max(1.0, (max_side_px / REFERENCE_SIDE_PX) ** 2)


def estimate_peak_gib(profile: MemoryProfile, max_side_px: int = REFERENCE_SIDE_PX) -> float:
    """Estimated peak GPU memory (GiB, CUDA context included) of a ``max_side_px`` render with
    ``profile`` (see the module docstring for where each term comes from)."""
    per_param = _transformer_bytes_per_param(profile)
    if profile.offload:
        block = TRANSFORMER_PARAMS / TRANSFORMER_BLOCKS
        transformer = _gib(2 * block, per_param) + _gib(0.005 * TRANSFORMER_PARAMS, 2)
    else:
        transformer = _gib(TRANSFORMER_PARAMS, per_param)
    resident = CONTEXT_GIB + transformer + _gib(VAE_PARAMS, 2)
    activations = _activations_gib(max_side_px)
    if profile.offload_text_encoder:
        # the text encoder's onloaded part and the denoising activations are never live together
        return resident + max(_gib(TEXT_ENCODER_ONLOADED_PARAMS, 2), activations)
    return resident + _gib(TEXT_ENCODER_PARAMS, 2) + activations


def fitting_profiles(free_gib: float, max_side_px: int = REFERENCE_SIDE_PX,
                     usable: Callable[[MemoryProfile], bool] = lambda _: True) -> list[MemoryProfile]:
    """The profiles whose estimate fits in ``free_gib``, fastest first: no offloading before
    offloading the text encoder (once per job) before offloading the transformer (every step),
    and within that, the least compressed first. ``usable`` filters out what this installation
    cannot do (e.g. torchao missing)."""
    fits = [p for p in all_profiles() if usable(p) and estimate_peak_gib(p, max_side_px) <= free_gib]
    return sorted(fits, key=lambda p: (p.offload, p.offload_text_encoder, -estimate_peak_gib(p, max_side_px)))


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
              usable: Callable[[MemoryProfile], bool] = lambda _: True) -> None:
    """Raises:
        DoesNotFit: ``profile``'s estimated peak is more than ``card``'s free memory.
    """
    need = estimate_peak_gib(profile, max_side_px)
    free = card.free_bytes / GIB
    if need <= free:
        return
    fits = fitting_profiles(free, max_side_px, usable)
    advice = ("profiles that would fit: " + ", ".join(p.name for p in fits)) if fits \
        else "no profile fits; free memory on the card or use a larger card"
    raise DoesNotFit(
        f"profile {profile.name!r} needs ~{need:.1f} GiB for {max_side_px}px renders (estimate), but "
        f"{card.name} has {free:.1f} GiB free of {card.total_bytes / GIB:.1f} GiB; {advice} "
        "(set EDITFARM_PROFILE)"
    )


def startup_refusal(profile_name: str, device: str, read_card: Callable[[], CardMemory | None],
                    max_side_px: int = REFERENCE_SIDE_PX,
                    usable: Callable[[MemoryProfile], bool] = lambda _: True) -> str | None:
    """Why a render worker must not start with ``profile_name`` on ``device`` ("cpu", "cuda",
    "cuda:N" or "auto"), or None when it may. Reads the card with ``read_card`` (NVML or
    nvidia-smi: never CUDA, so it is safe in the Celery parent); no card ("auto" without a GPU,
    or "cpu") checks only that the profile can run on the CPU.
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
        check_fit(profile, card, max_side_px, usable)
    except (ProfileError, DoesNotFit) as exc:
        return str(exc)
    return None
