"""Fast presets: what a worker does to a loaded model to render faster, as plain data.

* fused LoRAs: distilled few-step adapters (e.g. 4/8-step "lightning" LoRAs) merged into the
  transformer's weights at load, with the scheduler settings they were distilled for;
* a block cache: diffusers' first-block cache (skips the remaining blocks while the first
  block's residual barely changes; ``threshold``) or TaylorSeer (predicts skipped steps);
* regional ``torch.compile`` of the transformer's repeated blocks, warmed up at the sizes the
  worker serves.

Pure (no torch, no diffusers), like ``profiles``: parsed in the worker's settings today, carried
per model by a model catalog later. ``workers.pipeline.fast`` applies one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BLOCK_CACHES", "FastPreset", "PresetError", "parse_fuse_loras", "parse_sizes"]

# "mag" is listed to refuse it clearly: MagCache needs magnitude ratios calibrated per model and
# step count, and diffusers ships none for Qwen-Image.
BLOCK_CACHES: tuple[str, ...] = ("off", "first-block", "taylorseer", "mag")


class PresetError(ValueError):
    """A preset setting that is malformed or that this installation cannot do."""


def parse_fuse_loras(text: str) -> tuple[tuple[str, float], ...]:
    """``"/m/lightning-8step.safetensors:1.0,/m/style.safetensors:0.5"`` → ((path, scale), ...);
    a missing scale is 1.0.

    Raises:
        PresetError: an empty path or a scale that is not a finite number.
    """
    loras = []
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        path, value = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep:
            try:
                path, value = head, float(tail)
            except ValueError:
                pass  # a colon inside the path, and no scale
        if not path or not math.isfinite(value):
            raise PresetError(f"a fused LoRA is PATH[:SCALE], got {item!r}")
        loras.append((path, value))
    return tuple(loras)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"1024x1024,768x1344"`` → ((1024, 1024), (768, 1344)) (width x height, multiples of 16).

    Raises:
        PresetError: not WIDTHxHEIGHT, or a side that is not a positive multiple of 16.
    """
    sizes = []
    for item in (part.strip().lower() for part in (text or "").split(",")):
        if not item:
            continue
        try:
            width, height = (int(v) for v in item.split("x"))
        except ValueError:
            raise PresetError(f"a size is WIDTHxHEIGHT, got {item!r}") from None
        if width <= 0 or height <= 0 or width % 16 or height % 16:
            raise PresetError(f"sizes are positive multiples of 16 px, got {item!r}")
        sizes.append((width, height))
    return tuple(sizes)


@dataclass(frozen=True)
class FastPreset:
    """How a loaded model is sped up. The default changes nothing.

    Attributes:
        fuse_loras: (local .safetensors path, scale) merged into the transformer at load.
        scheduler: scheduler config overrides the fused LoRAs need (e.g. a distilled LoRA's
            fixed ``shift``), applied to every pipeline's scheduler.
        block_cache: one of ``BLOCK_CACHES``.
        block_cache_threshold: first-block cache: the relative change of the first block's
            residual below which the remaining blocks are skipped (higher: faster, coarser).
        compile: regional torch.compile of the repeated transformer blocks.
        warmup_sizes: (width, height) the warm-up renders, so a compiled model has compiled the
            shapes it serves before the worker reports ready.
    """

    fuse_loras: tuple[tuple[str, float], ...] = ()
    scheduler: dict[str, Any] = field(default_factory=dict)
    block_cache: str = "off"
    block_cache_threshold: float = 0.05
    compile: bool = False
    warmup_sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.block_cache not in BLOCK_CACHES:
            raise PresetError(f"block cache {self.block_cache!r} is not one of {BLOCK_CACHES}")
        if self.block_cache == "mag":
            raise PresetError("block cache 'mag' (MagCache) needs magnitude ratios calibrated for this model, "
                              "and none ship for Qwen-Image; use 'first-block' or 'taylorseer'")
        if not (math.isfinite(self.block_cache_threshold) and 0 < self.block_cache_threshold < 1):
            raise PresetError(f"block cache threshold must be in (0, 1), got {self.block_cache_threshold}")

    @property
    def name(self) -> str:
        """A short label, e.g. ``fused-lora+first-block(0.05)+compile``; ``plain`` for none."""
        parts = []
        if self.fuse_loras:
            parts.append("fused-lora")
        if self.block_cache != "off":
            parts.append(f"{self.block_cache}({self.block_cache_threshold:g})" if self.block_cache == "first-block"
                         else self.block_cache)
        if self.compile:
            parts.append("compile")
        return "+".join(parts) or "plain"

    @classmethod
    def parse(cls, *, fuse_loras: str = "", scheduler_overrides: str = "", block_cache: str = "off",
              block_cache_threshold: float = 0.05, compile: bool = False, warmup_sizes: str = "") -> FastPreset:
        """From the worker's settings' strings.

        Raises:
            PresetError: any field is malformed (``scheduler_overrides`` must be a JSON object).
        """
        scheduler: Any = {}
        if scheduler_overrides.strip():
            try:
                scheduler = json.loads(scheduler_overrides)
            except json.JSONDecodeError as exc:
                raise PresetError(f"scheduler overrides are a JSON object: {exc}") from None
            if not isinstance(scheduler, dict):
                raise PresetError("scheduler overrides are a JSON object, e.g. {\"shift\": 3.0}")
        return cls(fuse_loras=parse_fuse_loras(fuse_loras), scheduler=scheduler,
                   block_cache=(block_cache or "off").strip().lower(), block_cache_threshold=block_cache_threshold,
                   compile=compile, warmup_sizes=parse_sizes(warmup_sizes))
