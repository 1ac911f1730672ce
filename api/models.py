"""Request models and the documentation-only models of the job API's JSON.

:class:`SubmitParams` validates what a client sends (it *is* :class:`JobParams`
with an optional seed), so limits live in one place: ``broker.schema``.
:class:`JobRequest` and :class:`JobOut` exist for the OpenAPI document; the
response itself is built by :func:`broker.views.job_view`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from broker.schema import MAX_REFERENCE_IMAGES, MAX_SEED, JobParams, Output, Progress


class SubmitParams(JobParams):
    """JobParams as submitted: the seed may be left out (the API then picks and records one)."""

    seed: int | None = Field(  # type: ignore[assignment]  # optional on input, required in JobParams
        default=None, ge=0, le=MAX_SEED,
        description="Random seed (0 … 2^32-1). Omitted → a random one, returned in params.seed.",
    )


class JobRequest(SubmitParams):
    """The JSON body of POST /v1/jobs."""

    image: str | None = Field(
        default=None,
        description="The input image: a `data:image/png;base64,...` URL or an `https://` URL "
                    "(PNG, JPEG or WEBP). Required for every operation but generate (which takes none).",
    )
    images: list[str] | None = Field(
        default=None, max_length=MAX_REFERENCE_IMAGES,
        description="edit only: up to 3 reference images (data: or https:// URLs); the multi-image edit "
                    "pipeline then runs.",
    )
    mask: str | None = Field(
        default=None,
        description="inpaint: white = repaint (or give `boxes`); move: the object's silhouette inside "
                    "`move.box`. A data: or https:// URL of an image exactly the size of `image`.",
    )


class OutputOut(Output):
    url: str | None = Field(description="Presigned GET URL of the output; expires after presign_expiry_s. "
                                        "null once the job's data_removed.")


class JobErrorOut(BaseModel):
    code: str
    message: str


class JobUrls(BaseModel):
    self_: str = Field(alias="self", description="This job (GET)")
    cancel: str = Field(description="Cancel this job (POST)")


class JobOut(BaseModel):
    """A job as the API returns it (broker.views.job_view plus ``queue_position``)."""

    id: str
    status: str = Field(description="queued | running | succeeded | failed | canceled")
    queue_position: int | None = Field(
        default=None,
        description="While queued: jobs ahead of this one in the strict-priority render order "
                    "(0 = next to start), over all tenants. null once it left the queue.",
    )
    operation: str
    model: str = Field(description="The model that renders (rendered) the job: the one it named, else the "
                                   "catalog's default for its operation (GET /v1/models).")
    params: JobParams
    progress: Progress
    outputs: list[OutputOut]
    data_removed: bool = Field(default=False, description="The job's inputs and outputs were deleted by "
                                                          "their retention (EDITFARM_OBJECT_RETENTION_DAYS).")
    error: JobErrorOut | None
    attempts: int
    created_at: str | None = Field(description="ISO-8601 UTC")
    started_at: str | None
    finished_at: str | None
    urls: JobUrls


class JobList(BaseModel):
    """A page of GET /v1/jobs."""

    data: list[JobOut] = Field(description="The caller's jobs, newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null when there is none. A page may be "
                    "shorter than `limit` (even empty) while next_cursor is not null."
    )
    includes_archived: bool = Field(
        default=False,
        description="Always false: the list ends with the oldest job still in Redis. A job past its retention "
                    "(deleted from Redis, archived or not) is not listed; GET /v1/jobs/{id} reads an archived one.",
    )


class ModelDefaultsOut(BaseModel):
    steps: int | None = Field(description="Steps of a job that sets none (null: the API's default).")
    true_cfg_scale: float | None = Field(description="true_cfg_scale of a job that sets none (null: the API's).")


class ModelStateOut(BaseModel):
    workers_ready: int = Field(description="Render workers with this model loaded and alive now; 0: its jobs "
                                           "wait, queued, until one starts.")
    queued: int = Field(description="Its jobs waiting for a worker.")
    running: int = Field(description="Its jobs rendering now.")
    median_render_s: float | None = Field(description="Median render seconds of its last 50 renders (null: "
                                                      "none yet).")


class ModelOut(BaseModel):
    name: str = Field(description="What a job's `model` names.")
    pipeline: str = Field(description="The diffusers pipeline class the workers load it as.")
    operations: list[str] = Field(description="The operations it serves.")
    default_for: list[str] = Field(description="The operations whose jobs run on it when they name no model.")
    defaults: ModelDefaultsOut
    max_side_px: int | None = Field(description="The largest width or height it renders (null: the "
                                                "operation's own limit).")
    state: ModelStateOut


class ModelList(BaseModel):
    """GET /v1/models."""

    object: str = Field(default="list")
    data: list[ModelOut] = Field(description="Every model of the cluster, in catalog order.")


class CancelRequest(BaseModel):
    """The optional JSON body of POST /v1/jobs/{id}/cancel."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500,
                               description="Why; recorded in the job's error message.")


REF_TEMPLATE = "#/components/schemas/{model}"


def component_schemas() -> dict[str, Any]:
    """Schemas the routes reference by ``$ref`` but FastAPI cannot see (manually parsed bodies).

    Adds ``JobRequest`` and ``JobMultipartRequest`` (image as a binary file part),
    ``CancelRequest``, plus their enum definitions, keyed as OpenAPI components.
    """
    _, top = models_json_schema([(JobRequest, "validation"), (CancelRequest, "validation")],
                                ref_template=REF_TEMPLATE)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    multipart = dict(schemas["JobRequest"])
    multipart["title"] = "JobMultipartRequest"
    multipart["description"] = (
        "The multipart/form-data body of POST /v1/jobs: `image`, `images` (repeated, up to 3) and `mask` "
        "are file parts (or data:/https:// URLs as text fields); the other fields are form fields (numbers "
        "as text); the structured fields (" + ", ".join(f"`{n}`" for n in MULTIPART_JSON_FIELDS) + ") are "
        "JSON text; `webhook_events` may be repeated or comma-separated (`started,progress,completed`). "
        "At most 5 files.")
    binary = {"type": "string", "format": "binary"}
    properties = dict(multipart["properties"])
    for name in MULTIPART_JSON_FIELDS:
        properties[name] = {"type": "string", "contentMediaType": "application/json",
                            "description": f"`{name}` as JSON text, the same value as in a JSON body."}
    properties["image"] = {**binary, "description": "The input image file (not for generate)."}
    properties["images"] = {"type": "array", "items": binary, "maxItems": MAX_REFERENCE_IMAGES,
                            "description": "edit only: reference image files (repeat the part)."}
    properties["mask"] = {**binary, "description": "inpaint/move: the mask image file, the size of `image`."}
    multipart["properties"] = properties
    schemas["JobMultipartRequest"] = multipart
    return schemas


#: Fields that a multipart body carries as JSON text.
MULTIPART_JSON_FIELDS = ("boxes", "outpaint", "move", "upscale", "loras")
