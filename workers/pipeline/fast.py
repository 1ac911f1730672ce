"""Apply a ``FastPreset`` to a loaded Qwen-Image pipeline (diffusers' own mechanisms).

Two halves, because the memory profile goes between them: ``fuse_and_schedule`` merges the
distilled LoRAs into the full-precision weights (before any float8 cast or quantization) and
sets the scheduler they need; ``speed_up`` then installs the block cache and compiles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .compile_watch import CompileWatch
from .presets import FastPreset, PresetError

__all__ = ["fuse_and_schedule", "speed_up"]

log = logging.getLogger("editfarm.pipeline")


def fuse_and_schedule(pipe: Any, preset: FastPreset) -> None:
    """Fuse ``preset.fuse_loras`` into ``pipe``'s transformer (the adapters are then unloaded:
    their deltas live in the base weights, and per-request LoRAs load on top as usual), and
    replace the scheduler with one carrying ``preset.scheduler``'s overrides.

    Raises:
        PresetError: a LoRA file cannot be loaded into this model, or an override names a key
            the scheduler's config does not have.
    """
    if preset.fuse_loras:
        names = []
        for index, (path, _scale) in enumerate(preset.fuse_loras):
            name = f"fused_{index}"
            try:
                pipe.load_lora_weights(path, adapter_name=name)
            except Exception as exc:  # diffusers/peft raise many types for a bad file
                raise PresetError(f"fused LoRA {path!r} cannot be loaded: {type(exc).__name__}: {exc}"[:500]) from exc
            names.append(name)
        pipe.set_adapters(names, adapter_weights=[scale for _path, scale in preset.fuse_loras])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
        log.info("fused %d LoRA(s) into the transformer", len(names))
    if preset.scheduler:
        config = dict(pipe.scheduler.config)
        unknown = sorted(set(preset.scheduler) - set(config))
        if unknown:
            raise PresetError(f"scheduler overrides {unknown} are not settings of {type(pipe.scheduler).__name__}")
        pipe.scheduler = type(pipe.scheduler).from_config({**config, **preset.scheduler})


def _cache_config(preset: FastPreset) -> Any:
    import diffusers

    if preset.block_cache == "first-block":
        return diffusers.FirstBlockCacheConfig(threshold=preset.block_cache_threshold)
    if preset.block_cache == "taylorseer":
        return diffusers.TaylorSeerCacheConfig()
    raise PresetError(f"block cache {preset.block_cache!r} is not supported here")


def speed_up(pipe: Any, preset: FastPreset, on_recompile: Callable[[float], None] | None = None) -> CompileWatch | None:
    """Install ``preset``'s block cache on the transformer and compile its repeated blocks.
    Returns the compile watch when compiling (arm it after the warm-up), else None.

    Raises:
        PresetError: the transformer cannot take the cache (e.g. the first-block cache needs
            at least 2 blocks).
    """
    transformer = pipe.transformer
    if preset.block_cache != "off":
        blocks = len(getattr(transformer, "transformer_blocks", ()))
        if preset.block_cache == "first-block" and blocks < 2:
            raise PresetError(f"the first-block cache needs a transformer of 2 or more blocks; this one has {blocks}")
        transformer.enable_cache(_cache_config(preset))
        log.info("block cache %s on the transformer", preset.name)
    if not preset.compile:
        return None
    watch = CompileWatch(on_recompile)
    watch.watch_shapes(transformer)
    # regional torch.compile of the repeated MMDiT blocks: 1.21x faster than bare diffusers at
    # 50 steps on an H200 (bench/results-gpu-h200-compile.json); compiled during warm-up
    transformer.compile_repeated_blocks(fullgraph=True)
    return watch
