"""Which model of the catalog a job renders with, and the model's defaults written into the job.

Converted at the edge: the API resolves ``model`` (or the catalog's default for the operation) once,
at submission, and stores the name it chose, so a worker never guesses and a job record always says
which model made its images. A model's own defaults (steps, true CFG) fill what the job left unset.
"""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from broker.catalog import Catalog, ModelSpec
from broker.schema import ErrorCode, JobParams

__all__ = ["choose_model"]


def _names(models: tuple[ModelSpec, ...]) -> str:
    return ", ".join(spec.name for spec in models)


def _model(catalog: Catalog, params: JobParams) -> ModelSpec:
    operation = params.operation.value
    if params.model is None:
        spec = catalog.default_for(params.operation)
        if spec is None:
            raise ApiError(422, ErrorCode.UNSUPPORTED_OPERATION,
                           f"no model of this cluster serves {operation}", param="operation")
        return spec
    if params.model not in catalog:
        raise ApiError(422, ErrorCode.UNKNOWN_MODEL,
                       f"unknown model {params.model!r}; the models are {_names(catalog.models)}", param="model")
    spec = catalog.get(params.model)
    if not spec.serves(params.operation):
        serving = catalog.serving(params.operation)
        also = f"; models that do: {_names(serving)}" if serving else ""
        raise ApiError(422, ErrorCode.UNSUPPORTED_OPERATION,
                       f"model {spec.name!r} does not serve {operation}{also}", param="model")
    return spec


def choose_model(catalog: Catalog, params: JobParams) -> JobParams:
    """``params`` naming the model it renders with, the model's defaults in what the job did not set.

    Raises:
        ApiError: 422 ``unknown_model`` (no such model: the message lists the valid names),
            ``unsupported_operation`` (the model, or every model, does not serve the operation),
            ``invalid_parameter`` (a width or height over the model's largest side).
    """
    spec = _model(catalog, params)
    given = params.model_fields_set
    updates: dict[str, Any] = {"model": spec.name}
    if spec.defaults.steps is not None and "steps" not in given:
        updates["steps"] = spec.defaults.steps
    if spec.defaults.true_cfg_scale is not None and "true_cfg_scale" not in given:
        updates["true_cfg_scale"] = spec.defaults.true_cfg_scale
    if spec.max_side_px is not None:
        for side in ("width", "height"):
            value = getattr(params, side)
            if value is not None and value > spec.max_side_px:
                raise ApiError(422, ErrorCode.INVALID_PARAMETER,
                               f"{side} may be at most {spec.max_side_px} with model {spec.name!r}", param=side)
    return params.model_copy(update=updates)
