"""Which model of the catalog this render worker serves (a render worker serves exactly one).

Read in the Celery parent (the queues it consumes, its node name) and in the pool child (what it
loads): pure, no CUDA. The catalog is validated here too, so a worker started on an invalid catalog
stops before anything loads, with the file, the entry and the reason.
"""

from __future__ import annotations

import dataclasses

from broker import keys
from broker.catalog import Catalog, CatalogError, ModelSpec, UnknownModel, load_catalog
from broker.queues import RenderQueue
from workers.settings import WorkerSettings

__all__ = ["Served", "served_model"]


@dataclasses.dataclass(frozen=True)
class Served:
    """The model a render worker serves: its catalog ``name`` and entry (``spec`` None: a stand-in
    worker on a cluster that configured no catalog)."""

    name: str
    spec: ModelSpec | None

    @property
    def queues(self) -> tuple[str, ...]:
        """Its model's render queues in strict priority order (the worker's ``-Q``)."""
        return RenderQueue(model=self.name).order


def _catalog(settings: WorkerSettings) -> Catalog | None:
    if settings.models_file or settings.model:
        return load_catalog(models_file=settings.models_file, model=settings.model)
    if settings.renderer == "standin":
        return None
    return load_catalog()  # raises: no model configured


def served_model(settings: WorkerSettings) -> Served:
    """``EDITFARM_WORKER_MODEL`` (``editfarm worker --model``) of the catalog; without it the catalog's
    only model.

    Raises:
        CatalogError: the catalog is invalid or unset, the name is not in it, or it has several models
            and none is named.
    """
    catalog = _catalog(settings)
    if catalog is None:
        return Served(settings.worker_model or keys.LEGACY_MODEL, None)
    if settings.worker_model:
        try:
            return Served(settings.worker_model, catalog.get(settings.worker_model))
        except UnknownModel as exc:
            raise CatalogError(catalog.origin, [f"EDITFARM_WORKER_MODEL (--model): {exc}"]) from None
    if len(catalog) > 1:
        raise CatalogError(catalog.origin, [f"it has {len(catalog)} models: name the one this worker serves with "
                                            f"--model (EDITFARM_WORKER_MODEL): {', '.join(catalog.names)}"])
    spec = catalog.models[0]
    return Served(spec.name, spec)
