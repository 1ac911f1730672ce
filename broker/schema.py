"""The job schema: what a job is, the states it moves through, and its errors.

Times are UNIX epoch seconds (float) inside the system; the API and webhooks
render them as ISO-8601 at the edge (see :mod:`broker.views`).
"""

from __future__ import annotations

import enum
import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1


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
    EDIT = "edit"


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
    MISSING_IMAGE = "missing_image"
    INVALID_IMAGE = "invalid_image"
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_FETCH_FAILED = "image_fetch_failed"
    URL_NOT_ALLOWED = "url_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    JOB_FINISHED = "job_finished"
    METHOD_NOT_ALLOWED = "method_not_allowed"
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


class JobParams(BaseModel):
    """What the user asked for, validated. Images are referenced by storage key, never inlined."""

    model_config = ConfigDict(extra="forbid")

    operation: Operation = Operation.EDIT
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str | None = Field(default=" ", max_length=4000)
    seed: int = Field(ge=0, le=MAX_SEED)
    steps: int = Field(default=30, ge=2, le=100)  # the flow-match scheduler (shift_terminal) needs >= 2
    true_cfg_scale: float = Field(default=4.0, ge=1.0, le=20.0)
    output_format: OutputFormat = OutputFormat.PNG
    webhook: str | None = None
    webhook_events: list[WebhookEvent] = Field(default_factory=lambda: [WebhookEvent.COMPLETED])
    priority: Priority = Priority.NORMAL
    # running longer than this → failed with code "timeout" (seconds)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)
    # not started within this many seconds of submission → canceled with code "queue_deadline"
    queue_deadline_s: float | None = Field(default=None, gt=0, le=7 * 86400)


class Job(BaseModel):
    """The job record. The JobStore, not Celery's result backend, is the truth about a job."""

    id: str
    tenant: str
    status: JobStatus = JobStatus.QUEUED
    params: JobParams
    input_keys: list[str] = Field(default_factory=list)
    outputs: list[Output] = Field(default_factory=list)
    error: JobError | None = None
    progress: Progress = Field(default_factory=Progress)
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
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


def dump_fields(job: Job) -> dict[str, Any]:
    """The job as top-level fields of plain JSON-able values."""
    return job.model_dump(mode="json")
