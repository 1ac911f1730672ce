"""Pipeline adapters: the only package in editfarm that imports diffusers/transformers.

Importing this package is cheap and CUDA-free (safe in a Celery prefork parent): the
diffusers-backed renderer is imported only when ``load_renderer`` is called. ``tiny`` (the
test model builder) imports diffusers at module level; import it explicitly where needed.
"""

from __future__ import annotations

import os

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
    UpscaleSpec,
)

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
    "OutpaintSpec",
    "Previews",
    "RenderInterrupted",
    "RenderRequest",
    "Renderer",
    "StepCallback",
    "UpscaleSpec",
    "load_renderer",
]


def load_renderer(model: str, device: str, dtype: str | None = None, compile_blocks: bool = False) -> Renderer:
    """Load ``model`` (local folder or hub id of a QwenImageEditPipeline) onto ``device``; the
    renderer serves every operation in ``OPERATIONS`` from that one set of weights.

    ``dtype`` defaults to bf16 on CUDA and float32 elsewhere. ``compile_blocks`` compiles the
    transformer's repeated blocks with torch.compile (GPU speed-up; the first render compiles). Call this in the worker child
    process (after fork), never in the parent: it initialises the device.

    Raises:
        ValueError: unknown ``dtype``.
        RuntimeError: bad or unavailable ``device``.
        OSError: ``model`` missing or incomplete.
    """
    from .diffusers_renderer import DiffusersRenderer

    renderer = DiffusersRenderer.load(model, device=device, dtype=dtype)
    if compile_blocks:
        # regional torch.compile of the repeated MMDiT blocks: 1.21x faster than bare diffusers at
        # 50 steps on an H200 (bench/results-gpu-h200-compile.json); compiled during warm-up
        renderer.pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return renderer
