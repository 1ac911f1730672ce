"""The job schema: what a job is, the states it moves through, and its errors.

Times are UNIX epoch seconds (float) inside the system; the API and webhooks
render them as ISO-8601 at the edge (see :mod:`broker.views`).
"""

from __future__ import annotations

import enum
import math
import secrets
import time
import urllib.parse
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from broker.keys import LEGACY_MODEL

MAX_SEED = 2**32 - 1

# Limits of the render operations. They mirror workers/pipeline/base.py (broker imports nothing
# else of ours; tests/test_runner_operations.py checks that both agree).
SIZE_MULTIPLE = 16
MIN_SIDE = 16
MAX_NATIVE_SIDE = 1024  # edit/generate width and height
MAX_UPSCALE_SIDE = 2048  # upscale target
MAX_CANVAS_SIDE = 4096  # outpainted canvas
MAX_NUM_IMAGES = 4
MAX_REFERENCE_IMAGES = 3
MAX_BOXES = 16
MAX_LORAS = 4
MAX_LORA_SCALE = 4.0
MIN_STRENGTH = 0.01
MAX_DPI = 10000
OUTPAINT_DIRECTIONS = (
    "center", "left", "right", "top", "bottom", "top-left", "top-right", "bottom-left", "bottom-right",
)


class JobStatus(str, enum.Enum):
    """Lifecycle of a job: queued → running → succeeded | failed | canceled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """True once the job can never change state again."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# The only legal moves. `running → queued` hands a job back (drain, lost lease).
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED, JobStatus.RUNNING}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """Statuses from which a job may move to ``target``."""
    return frozenset(s for s, targets in ALLOWED_TRANSITIONS.items() if target in targets)


class Operation(str, enum.Enum):
    """What a job does (see docs/api.md "Operations" and workers/operations.py)."""

    EDIT = "edit"
    GENERATE = "generate"
    INPAINT = "inpaint"
    OUTPAINT = "outpaint"
    MOVE = "move"
    UPSCALE = "upscale"

    @property
    def takes_image(self) -> bool:
        """Whether the operation works on an input image (every one but generate)."""
        return self is not Operation.GENERATE

    @property
    def takes_mask(self) -> bool:
        return self in (Operation.INPAINT, Operation.MOVE)

    @property
    def max_side(self) -> int | None:
        """The largest ``width``/``height`` the operation takes; None: it takes none."""
        if self in (Operation.EDIT, Operation.GENERATE):
            return MAX_NATIVE_SIDE
        if self is Operation.UPSCALE:
            return MAX_UPSCALE_SIDE
        return None


class Priority(str, enum.Enum):
    """Render queues are consumed in strict order: every high job before any normal one."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


PRIORITY_ORDER = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class WebhookEvent(str, enum.Enum):
    """What a job's webhook is told: ``completed`` (always, retried), ``started``, ``progress`` (best effort)."""

    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"


class OutputFormat(str, enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class ErrorCode(str, enum.Enum):
    """Machine-readable error codes, shared by API responses and failed jobs."""

    # request errors (4xx)
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    INVALID_PARAMETER = "invalid_parameter"
    UNKNOWN_OPERATION = "unknown_operation"
    UNKNOWN_MODEL = "unknown_model"  # 422: no model of that name in the catalog
    UNSUPPORTED_OPERATION = "unsupported_operation"  # 422: the model does not serve the operation
    MISSING_IMAGE = "missing_image"
    INVALID_INPUT = "invalid_input"  # a job whose inputs cannot be rendered as asked (found by the worker)
    INVALID_IMAGE = "invalid_image"
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    URL_NOT_ALLOWED = "url_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REQUEST_TIMEOUT = "request_timeout"  # 408: the request body arrived too slowly
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    JOB_FINISHED = "job_finished"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    RATE_LIMITED = "rate_limited"  # 429: too many submissions per minute
    TOO_MANY_JOBS = "too_many_jobs"  # 429: too many jobs queued or running
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"  # 409: Idempotency-Key reused with another body
    IDEMPOTENCY_IN_PROGRESS = "idempotency_in_progress"  # 409: the first request with the key still runs
    JOB_NOT_FINISHED = "job_not_finished"  # 409: redelivery of a job that has not ended
    NO_WEBHOOK = "no_webhook"  # 409: redelivery for a job without a (stored) webhook message
    # job failures
    INPUT_UNREADABLE = "input_unreadable"
    RENDER_FAILED = "render_failed"
    UPLOAD_FAILED = "upload_failed"
    INTERNAL_ERROR = "internal_error"
    TIMEOUT = "timeout"
    QUEUE_DEADLINE = "queue_deadline"
    CANCELED = "canceled"
    WORKER_LOST = "worker_lost"
    OUT_OF_MEMORY = "out_of_memory"
    # infrastructure
    UNAVAILABLE = "unavailable"
    # 503: the job store's replicas did not confirm the write in time; retry with the same Idempotency-Key
    STORE_UNAVAILABLE = "store_unavailable"


class JobError(BaseModel):
    code: str
    message: str


class Progress(BaseModel):
    step: int = 0
    total: int = 0


class Output(BaseModel):
    """One rendered image in the object store (no URL: URLs are presigned at the edge)."""

    key: str
    content_type: str
    width: int
    height: int
    sha256: str
    size_bytes: int


def _check_box(box: list[float]) -> list[float]:
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box) or not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError("a box is [x0, y0, x1, y1] relative to the image with 0 <= x0 < x1 <= 1 "
                         "and 0 <= y0 < y1 <= 1")
    return box


Box = Annotated[
    list[float], Field(min_length=4, max_length=4,
                       description="[x0, y0, x1, y1], relative to the image (0..1), x0 < x1, y0 < y1"),
    AfterValidator(_check_box),
]


class OutpaintParams(BaseModel):
    """Extend the canvas: margins in px, or a target ``width``/``height`` with a ``direction``."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(default=0, ge=0, le=MAX_CANVAS_SIDE, description="px added on the left")
    top: int = Field(default=0, ge=0, le=MAX_CANVAS_SIDE, description="px added at the top")
    right: int = Field(default=0, ge=0, le=MAX_CANVAS_SIDE, description="px added on the right")
    bottom: int = Field(default=0, ge=0, le=MAX_CANVAS_SIDE, description="px added at the bottom")
    width: int | None = Field(default=None, ge=1, le=MAX_CANVAS_SIDE,
                              description="target canvas width (>= the image's); exclusive with margins")
    height: int | None = Field(default=None, ge=1, le=MAX_CANVAS_SIDE,
                               description="target canvas height (>= the image's); exclusive with margins")
    direction: Literal[OUTPAINT_DIRECTIONS] = Field(  # type: ignore[valid-type]
        default="center", description="with a target size: where the new area goes")

    @model_validator(mode="after")
    def _margins_or_target(self) -> OutpaintParams:
        margins = (self.left, self.top, self.right, self.bottom)
        has_target = self.width is not None or self.height is not None
        if has_target and any(margins):
            raise ValueError("give margins (left/top/right/bottom) or a target width/height, not both")
        if not has_target and not any(margins):
            raise ValueError("give a margin > 0 or a target width/height")
        return self

    def canvas(self, image: tuple[int, int]) -> tuple[int, int]:
        """The outpainted canvas size for an input of size ``image``."""
        if self.width is None and self.height is None:
            return (image[0] + self.left + self.right, image[1] + self.top + self.bottom)
        return (self.width or image[0], self.height or image[1])


class MoveParams(BaseModel):
    """Cut the object in ``box``, scale it by ``scale`` about its centre, move it by (dx, dy) px."""

    model_config = ConfigDict(extra="forbid")

    box: Box
    dx: int = Field(default=0, ge=-MAX_CANVAS_SIDE, le=MAX_CANVAS_SIDE, description="px, positive: right")
    dy: int = Field(default=0, ge=-MAX_CANVAS_SIDE, le=MAX_CANVAS_SIDE, description="px, positive: down")
    scale: float = Field(default=1.0, ge=0.05, le=4.0, description="size factor of the object")
    seam: int = Field(default=8, ge=0, le=256, description="px band around the pasted object repainted")

    @model_validator(mode="after")
    def _moves_something(self) -> MoveParams:
        if self.dx == 0 and self.dy == 0 and self.scale == 1.0:
            raise ValueError("the move changes nothing: give dx, dy or a scale other than 1")
        return self


class UpscaleParams(BaseModel):
    """Tiling of an upscale; the target is ``width``/``height`` of the job, else image x ``scale``."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(default=2.0, gt=0, le=8, description="enlargement without a width/height")
    tile: int = Field(default=1024, ge=32, le=MAX_NATIVE_SIDE, multiple_of=SIZE_MULTIPLE,
                      description="tile side in px")
    overlap: int = Field(default=128, ge=0, description="px, less than tile / 2")

    @model_validator(mode="after")
    def _overlap_below_half_a_tile(self) -> UpscaleParams:
        if 2 * self.overlap >= self.tile:
            raise ValueError("overlap must be less than tile / 2")
        return self


LORA_SUFFIX = ".safetensors"


def lora_location(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket or host, key or path)`` of a LoRA uri (``s3://bucket/key.safetensors``,
    ``https://host/path.safetensors``). Raises ValueError for anything else."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        key = parts.path.lstrip("/")
        if not parts.netloc or not key or parts.query or parts.fragment:
            raise ValueError("an s3 LoRA uri is s3://<bucket>/<key>.safetensors")
        location = (scheme, parts.netloc, key)
    elif scheme in ("https", "http"):
        if not parts.hostname:
            raise ValueError("a LoRA URL needs a host")
        location = (scheme, parts.hostname, parts.path)
    else:
        raise ValueError("a LoRA uri is s3://<bucket>/<key>.safetensors or an https:// URL")
    if not location[2].lower().endswith(LORA_SUFFIX):
        raise ValueError(f"a LoRA file must be a {LORA_SUFFIX} file")
    return location


class LoraParams(BaseModel):
    """One LoRA adapter applied for this job only."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(max_length=2048, description="s3://<bucket>/<key>.safetensors (the cluster's bucket) "
                                                  "or an https:// URL of a .safetensors file")
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, description="adapter weight")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        lora_location(uri)
        return uri


class ParamProblem(ValueError):
    """Fields that are valid one by one but not together (a field that does not apply to the
    operation, a spec the operation needs): ``code`` and ``param`` for the API's error."""

    def __init__(self, code: ErrorCode, param: str, message: str) -> None:
        super().__init__(message)
        self.code, self.param, self.message = code, param, message


def operation_problem(params: JobParams) -> ParamProblem | None:
    """The first field of ``params`` that does not fit its operation, or None.

    Covers what the params alone decide; what needs the images (a mask, references, the
    outpainted canvas) is checked where the images are (the API's intake).
    """
    op = params.operation
    if op in (Operation.EDIT, Operation.GENERATE) and params.prompt is None:
        return ParamProblem(ErrorCode.MISSING_FIELD, "prompt", f"prompt is required for {op.value}")
    limit = op.max_side
    for name in ("width", "height"):
        value = getattr(params, name)
        if value is None:
            continue
        if limit is None:
            return ParamProblem(ErrorCode.INVALID_PARAMETER, name,
                                f"{name} does not apply to {op.value}: its output size follows the input")
        if value > limit:
            return ParamProblem(ErrorCode.INVALID_PARAMETER, name,
                                f"{name} is at most {limit} for {op.value}")
    if params.strength is not None and op in (Operation.EDIT, Operation.GENERATE):
        return ParamProblem(ErrorCode.INVALID_PARAMETER, "strength", f"strength does not apply to {op.value}")
    if params.boxes and op is not Operation.INPAINT:
        return ParamProblem(ErrorCode.INVALID_PARAMETER, "boxes", f"boxes do not apply to {op.value}")
    for name in ("outpaint", "move", "upscale"):
        given = getattr(params, name) is not None
        if given and op.value != name:
            return ParamProblem(ErrorCode.INVALID_PARAMETER, name, f"{name} does not apply to {op.value}")
        if not given and op.value == name and name != "upscale":
            return ParamProblem(ErrorCode.MISSING_FIELD, name, f"{name} is required for {op.value}")
    return None


class JobParams(BaseModel):
    """What the user asked for, validated. Images are referenced by storage key, never inlined.

    Fields that do not apply to the operation are refused (see :func:`operation_problem`);
    a refusal is a ``ValidationError`` of type ``job_params`` whose ctx has ``code`` and ``param``.
    """

    model_config = ConfigDict(extra="forbid")

    operation: Operation = Operation.EDIT
    # the catalog's name of the model to render with (broker/catalog.py); None: the catalog's default for the
    # operation. The API writes the model it resolved, so a stored job always names one.
    model: str | None = Field(default=None, min_length=1, max_length=64,
                              description="The model to render with (GET /v1/models); default: the "
                                          "catalog's default for the operation.")
    prompt: str | None = Field(default=None, min_length=1, max_length=4000,
                               description="The instruction (edit) or description; required for edit "
                                           "and generate, optional for the others.")
    negative_prompt: str | None = Field(default=" ", max_length=4000)
    seed: int = Field(ge=0, le=MAX_SEED)
    steps: int = Field(default=30, ge=2, le=100)  # the flow-match scheduler (shift_terminal) needs >= 2
    true_cfg_scale: float = Field(default=4.0, ge=1.0, le=20.0)
    width: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_UPSCALE_SIDE, multiple_of=SIZE_MULTIPLE,
        description="Output width in px, a multiple of 16: edit/generate (at most 1024), upscale target "
                    "(at most 2048). Not for inpaint/outpaint/move.")
    height: int | None = Field(
        default=None, ge=MIN_SIDE, le=MAX_UPSCALE_SIDE, multiple_of=SIZE_MULTIPLE,
        description="Output height in px; as width.")
    strength: float | None = Field(
        default=None, ge=MIN_STRENGTH, le=1.0,
        description="How much is re-noised (inpaint/outpaint/move default 1, upscale 0.3). "
                    "Not for edit/generate.")
    num_images: int = Field(default=1, ge=1, le=MAX_NUM_IMAGES, description="Outputs to render (1..4).")
    boxes: list[Box] = Field(default_factory=list, max_length=MAX_BOXES,
                             description="inpaint: relative boxes to repaint (united with the mask).")
    outpaint: OutpaintParams | None = Field(default=None, description="Required for outpaint.")
    move: MoveParams | None = Field(default=None, description="Required for move.")
    upscale: UpscaleParams | None = Field(default=None, description="upscale: tiling and default scale.")
    loras: list[LoraParams] = Field(default_factory=list, max_length=MAX_LORAS,
                                    description="LoRA adapters applied for this job only (at most 4).")
    output_format: OutputFormat = OutputFormat.PNG
    output_quality: int | None = Field(default=None, ge=1, le=100,
                                       description="JPEG/WebP quality (default 95); PNG ignores it.")
    dpi: int | None = Field(default=None, ge=1, le=MAX_DPI, description="Resolution written into the file.")
    webhook: str | None = None
    webhook_events: list[WebhookEvent] = Field(default_factory=lambda: [WebhookEvent.COMPLETED])
    priority: Priority = Priority.NORMAL
    # running longer than this → failed with code "timeout" (seconds)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)
    # not started within this many seconds of submission → canceled with code "queue_deadline"
    queue_deadline_s: float | None = Field(default=None, gt=0, le=7 * 86400)
    # the finished job leaves Redis this many seconds after finished_at: at most the tenant's retention
    # (which the API writes here when the job asks for none)
    retention_s: int | None = Field(default=None, gt=0, le=10 * 365 * 86400)

    @model_validator(mode="after")
    def _fits_the_operation(self) -> JobParams:
        problem = operation_problem(self)
        if problem is not None:
            raise PydanticCustomError("job_params", "{message}", {
                "code": problem.code.value, "param": problem.param, "message": problem.message})
        return self


class Job(BaseModel):
    """The job record. The JobStore, not Celery's result backend, is the truth about a job."""

    id: str
    tenant: str
    status: JobStatus = JobStatus.QUEUED
    params: JobParams
    # [main image, reference 1..3]; empty for generate
    input_keys: list[str] = Field(default_factory=list)
    mask_key: str | None = None
    outputs: list[Output] = Field(default_factory=list)
    error: JobError | None = None
    progress: Progress = Field(default_factory=Progress)
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    handbacks: int = 0  # runs handed back on purpose (storage unreachable, drain): not worker deaths
    worker: str | None = None
    lease_until: float | None = None


def queue_deadline_at(job: Job) -> float | None:
    """Epoch seconds after which a still-queued job is canceled, or None."""
    if job.params.queue_deadline_s is None:
        return None
    return job.created_at + job.params.queue_deadline_s


def new_job_id() -> str:
    """A random, URL-safe, unguessable job id."""
    return "job_" + secrets.token_hex(12)


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def model_of(job: Job) -> str:
    """The model a job renders with (a record from before the fleet names none: the one-model cluster's)."""
    return job.params.model or LEGACY_MODEL


def dump_fields(job: Job) -> dict[str, Any]:
    """The job as top-level fields of plain JSON-able values."""
    return job.model_dump(mode="json")
