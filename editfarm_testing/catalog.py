"""Model catalogs for local clusters in tests and benchmarks: the suites run on a fleet whose models have
non-legacy names, so every queue, index and label they touch is a per-model one (issue 14).

:func:`fleet_catalog` writes the two-model catalog the integration suites share, and returns the
:class:`cli.cluster.ClusterConfig` keyword arguments that run it (``models_file``, ``render_pools``)::

    ClusterConfig(workdir=workdir, api_keys=API_KEYS, **fleet_catalog(workdir, edit_source=tiny_model))

- ``qwen-image-edit`` (``QwenImageEditPipeline``): serves every operation and is the default for all of
  them, so a job that names no model runs here, as on a one-model cluster; ``edit_workers`` workers.
- ``qwen-image`` (``QwenImagePipeline``, ``generate`` only, the default for nothing): no worker unless
  ``text_to_image_workers`` says so (a diffusers one needs a ``text_to_image_source`` of that class).

A cluster started from it has no ``EDITFARM_MODEL`` (the catalog refuses both): a worker that needs other
weights serves a further model of the catalog (``extra``), e.g. one whose source is the tiny model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from broker import keys

EDIT_MODEL = "qwen-image-edit"
TEXT_TO_IMAGE_MODEL = "qwen-image"
CATALOG_FILE = "models.yaml"


@dataclasses.dataclass(frozen=True)
class CatalogModel:
    """One entry of a test catalog and how many render workers the cluster starts for it.

    ``operations`` None: every operation the pipeline serves (the catalog's own default).
    """

    name: str
    source: str | Path
    pipeline: str = "QwenImageEditPipeline"
    operations: Sequence[str] | None = None
    default_for: Sequence[str] = ()
    workers: int = 0

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "source": str(self.source), "pipeline": self.pipeline}
        if self.operations is not None:
            out["operations"] = list(self.operations)
        if self.default_for:
            out["default_for"] = list(self.default_for)
        return out


def legacy_render_keys() -> tuple[str, ...]:
    """The one-model cluster's render queues, queued sets and in-flight list: on a fleet whose models
    all have other names, none of them may ever hold anything (Redis drops an empty list or set)."""
    return (*(keys.render_queue(p) for p in keys.RENDER_PRIORITIES), *(keys.queued(p) for p in keys.RENDER_PRIORITIES),
            keys.inflight())


def write_catalog(path: Path, models: Sequence[CatalogModel]) -> dict[str, Any]:
    """Write ``models`` as a catalog file at ``path``; returns ``{"models_file", "render_pools"}`` for
    ``ClusterConfig`` (a pool per model with workers, in the order given: worker indexes follow it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"models": [m.entry() for m in models]}, sort_keys=False))
    return {"models_file": path, "render_pools": {m.name: m.workers for m in models if m.workers > 0}}


def fleet_models(*, edit_source: str | Path, edit_workers: int = 1, text_to_image_source: str | Path | None = None,
                 text_to_image_workers: int = 0) -> list[CatalogModel]:
    """The two models of :func:`fleet_catalog` (see the module docstring)."""
    every = ("generate", "edit", "inpaint", "outpaint", "move", "upscale")
    # None: no diffusers worker loads qwen-image (none, or stand-ins that load nothing): any path will do
    t2i_source = text_to_image_source if text_to_image_source is not None else "/nowhere/tiny-text-to-image"
    return [
        CatalogModel(name=EDIT_MODEL, source=edit_source, pipeline="QwenImageEditPipeline", default_for=every,
                     workers=edit_workers),
        CatalogModel(name=TEXT_TO_IMAGE_MODEL, source=t2i_source, pipeline="QwenImagePipeline",
                     operations=("generate",), workers=text_to_image_workers),
    ]


def fleet_catalog(workdir: Path, *, edit_source: str | Path, edit_workers: int = 1,
                  text_to_image_source: str | Path | None = None, text_to_image_workers: int = 0,
                  extra: Sequence[CatalogModel] = ()) -> dict[str, Any]:
    """Write the two-model catalog (plus ``extra`` models) as ``workdir/models.yaml``; returns the
    ``ClusterConfig`` keyword arguments ``models_file`` and ``render_pools``.

    ``edit_source``: the folder ``qwen-image-edit`` loads (the tiny edit model; any path when the
    workers run the render stand-in, which loads nothing); ``text_to_image_source`` likewise for
    ``qwen-image`` (None: a path that does not exist, for a model no diffusers worker serves).
    """
    models = fleet_models(edit_source=edit_source, edit_workers=edit_workers,
                          text_to_image_source=text_to_image_source, text_to_image_workers=text_to_image_workers)
    return write_catalog(workdir / CATALOG_FILE, [*models, *extra])
