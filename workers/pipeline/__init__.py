"""Pipeline adapters: the only package in editfarm that imports diffusers/transformers.

Importing this package is cheap and CUDA-free (safe in a Celery prefork parent): the
diffusers-backed renderer is imported only when ``load_renderer`` is called. ``tiny`` (the
test model builder) imports diffusers at module level; import it explicitly where needed.
"""

from __future__ import annotations

from .base import OPERATIONS, Renderer, RenderInterrupted, RenderRequest, StepCallback

__all__ = [
    "OPERATIONS",
    "RenderInterrupted",
    "RenderRequest",
    "Renderer",
    "StepCallback",
    "load_renderer",
]


def load_renderer(model: str, device: str, dtype: str | None = None) -> Renderer:
    """Load ``model`` (local folder or hub id of a QwenImageEditPipeline) onto ``device``.

    ``dtype`` defaults to bf16 on CUDA and float32 elsewhere. Call this in the worker child
    process (after fork), never in the parent: it initialises the device.

    Raises:
        ValueError: unknown ``dtype``.
        RuntimeError: bad or unavailable ``device``.
        OSError: ``model`` missing or incomplete.
    """
    from .diffusers_renderer import DiffusersRenderer

    return DiffusersRenderer.load(model, device=device, dtype=dtype)
