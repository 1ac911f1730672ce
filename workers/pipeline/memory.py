"""Apply a ``MemoryProfile`` to a loaded Qwen-Image pipeline, with diffusers' and torchao's own
mechanisms (no kernels of ours), and place every module on its device.

Call ``apply_profile`` on a pipeline fresh from ``from_pretrained`` (on the CPU, in the model
dtype), after any LoRA has been fused: the weights are cast or quantized in host memory first,
so a card that cannot hold the bf16 transformer never has to.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from .profiles import MemoryProfile, ProfileError, torchao_available

__all__ = ["FP8_SKIP_PATTERNS", "apply_profile", "fp8_skip_patterns"]

log = logging.getLogger("editfarm.pipeline")

# Kept in the model dtype under fp8-storage: float8 there turns outputs into noise. Regexes
# matched (re.search) against module names of QwenImageTransformer2DModel: the norms, the
# embeddings (positional, timestep, the image and text input projections) and the output
# projection. The first and last blocks are added per model by ``fp8_skip_patterns``.
FP8_SKIP_PATTERNS: tuple[str, ...] = (
    "norm", "pos_embed", "time_text_embed", "img_in", "txt_in", "proj_out",
    # LoRA layers (PEFT) are tiny: casting them saves nothing and costs precision
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
)


def fp8_skip_patterns(transformer: Any) -> tuple[str, ...]:
    """``FP8_SKIP_PATTERNS`` plus the transformer's first and last blocks."""
    last = len(transformer.transformer_blocks) - 1
    return (*FP8_SKIP_PATTERNS, r"^transformer_blocks\.0\.", rf"^transformer_blocks\.{last}\.")


def _store_fp8(transformer: Any, compute_dtype: torch.dtype) -> None:
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                         skip_modules_pattern=fp8_skip_patterns(transformer))


def _quantize(transformer: Any, weights: str) -> None:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if weights == "int8" else Float8WeightOnlyConfig()
    skip = fp8_skip_patterns(transformer)

    def wanted(module: torch.nn.Module, name: str) -> bool:
        # the same layers as fp8-storage stay in the model dtype
        return isinstance(module, torch.nn.Linear) and not any(re.search(p, name) for p in skip)

    quantize_(transformer, config, filter_fn=wanted)


def _group_offload(module: Any, device: torch.device) -> None:
    from diffusers.hooks import apply_group_offloading

    # Streams overlap the next block's copy with this block's compute (CUDA only). Never
    # record_stream: it corrupted Qwen-Image outputs in some diffusers releases; without it the
    # hook synchronises before reusing a block's memory, which is correct in every release.
    use_stream = device.type == "cuda"
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream,
                           record_stream=False, non_blocking=use_stream)


def apply_profile(pipe: Any, profile: MemoryProfile, device: str, compute_dtype: torch.dtype, *,
                  allow_offload_on_cpu: bool = False) -> None:
    """Store, quantize and offload ``pipe``'s models as ``profile`` says, then move what is not
    offloaded to ``device``. ``compute_dtype``: the dtype layers compute in (the model dtype).

    ``allow_offload_on_cpu`` lets tests and benchmarks install the offload hooks on a CPU
    render device (where they move nothing) to check that rendering through them works; a
    worker never sets it.

    Raises:
        ProfileError: the device cannot do ``profile`` (offloading on the CPU), or torchao is
            missing for ``int8`` / ``fp8``.
    """
    target = torch.device(device)
    if not allow_offload_on_cpu:
        profile.check_device(target.type)
    if profile.needs_torchao and not torchao_available():
        raise ProfileError(f"profile {profile.name!r} needs torchao, which is not installed (pip install torchao)")
    transformer, text_encoder = pipe.transformer, pipe.text_encoder
    if profile.weights == "fp8-storage":
        _store_fp8(transformer, compute_dtype)
    elif profile.needs_torchao:
        _quantize(transformer, profile.weights)
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        if (component is transformer and profile.offload) or (component is text_encoder and profile.offload_text_encoder):
            _group_offload(component, target)
        else:
            component.to(target)
        log.debug("%s placed (profile %s)", name, profile.name)
