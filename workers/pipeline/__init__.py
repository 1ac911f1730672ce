"""Pipeline adapters: the only package in editfarm that imports diffusers/transformers.

Importing this package is cheap and CUDA-free (safe in a Celery prefork parent): the
diffusers-backed renderer is imported only when ``load_renderer`` is called. ``tiny`` (the
test model builder) imports diffusers at module level; import it explicitly where needed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection

from .base import (
    OPERATIONS,
    InvalidRequest,
    MoveSpec,
    OutpaintSpec,
    Previews,
    Renderer,
    RenderInterrupted,
    RenderRequest,
    StepCallback,
    UnsupportedOperation,
    UpscaleSpec,
)
from .presets import FastPreset, PresetError
from .profiles import MemoryProfile, ProfileError, parse_profile

# `import diffusers` calls torch.cuda.is_available(); by default that CUDA probe makes every
# forked child fail with "Cannot re-initialize CUDA in forked subprocess" (seen on an H200 with
# torch 2.11). The NVML-based probe does not poison fork. Set here, before anything can import
# diffusers, so a stray import in the Celery prefork parent cannot break the render children;
# setdefault keeps an explicit operator choice.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

__all__ = [
    "OPERATIONS",
    "InvalidRequest",
    "MoveSpec",
    "FastPreset",
    "MemoryProfile",
    "OutpaintSpec",
    "Previews",
    "PresetError",
    "ProfileError",
    "RenderInterrupted",
    "RenderRequest",
    "Renderer",
    "StepCallback",
    "UnsupportedOperation",
    "UpscaleSpec",
    "load_renderer",
    "parse_profile",
]


def load_renderer(model: str, device: str, dtype: str | None = None, compile_blocks: bool = False, *,
                  pipeline: str = "QwenImageEditPipeline", operations: Collection[str] | None = None,
                  profile: MemoryProfile | None = None, preset: FastPreset | None = None,
                  on_recompile: Callable[[float], None] | None = None) -> Renderer:
    """Load ``model`` (local folder or hub id) as the diffusers class ``pipeline`` (a catalog
    entry's: ``QwenImagePipeline``, ``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``,
    ``QwenImageEditInpaintPipeline`` or ``QwenImage21Pipeline``) onto ``device``. The renderer
    serves what those weights can run (broker/catalog.py ``PIPELINE_OPERATIONS``; the default
    edit model: every operation in ``OPERATIONS``), or the subset ``operations``, and refuses
    the rest with ``UnsupportedOperation``.

    ``dtype`` defaults to bf16 on CUDA and float32 elsewhere. ``profile``: how the weights are
    stored and where they live (``profiles``; default all on ``device``); ``preset``: fused
    LoRAs, block cache, compile (``presets``). ``compile_blocks`` turns the preset's compile on
    (the transformer's repeated blocks with torch.compile; the warm-up compiles;
    ``on_recompile(seconds)`` hears of every later compile). Call this in the worker child
    process (after fork), never in the parent: it initialises the device.

    Raises:
        ValueError: unknown ``dtype`` or ``pipeline``, ``operations`` the class cannot serve;
            ``ProfileError`` / ``PresetError`` (both ValueError): a profile the device cannot
            do, a preset that does not fit the model.
        RuntimeError: bad or unavailable ``device``.
        OSError: ``model`` missing or incomplete.
    """
    from .diffusers_renderer import DiffusersRenderer

    preset = preset or FastPreset()
    if compile_blocks and not preset.compile:
        preset = dataclasses.replace(preset, compile=True)
    return DiffusersRenderer.load(model, device=device, dtype=dtype, pipeline=pipeline, operations=operations,
                                  profile=profile, preset=preset, on_recompile=on_recompile)
