"""Typed views of what the API returns: jobs, outputs, progress, live events and the models.

Every model is a frozen dataclass built with ``from_dict`` from the API's JSON.
Fields the API may add later are ignored (the whole object stays available as
``Job.raw``), so a newer server does not break an older client.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from editfarm_client.errors import JobFailed

#: The operations of ``POST /v1/jobs``. A server may support only some of them
#: (it answers ``unknown_operation`` for the others).
Operation = Literal["edit", "generate", "inpaint", "outpaint", "move", "upscale"]
#: Job statuses: ``queued → running → succeeded | failed | canceled``.
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
Priority = Literal["high", "normal", "low"]
OutputFormat = Literal["png", "jpeg", "webp"]
WebhookEventName = Literal["started", "progress", "completed"]

TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else []


@dataclass(frozen=True)
class Progress:
    """Denoising progress: ``step`` of ``total`` (``0/0`` before the job starts)."""

    step: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        """``step / total`` in 0..1 (0 while ``total`` is unknown)."""
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Progress:
        data = data or {}
        return cls(step=_int(data.get("step")), total=_int(data.get("total")))


@dataclass(frozen=True)
class Output:
    """One rendered image: a presigned ``url`` (expires), its storage ``key`` and checksums."""

    url: str
    key: str
    content_type: str
    width: int
    height: int
    sha256: str
    size_bytes: int

    @property
    def extension(self) -> str:
        """File extension for ``content_type`` (``png``, ``jpg``, ``webp``...)."""
        sub = self.content_type.split("/", 1)[-1].split(";", 1)[0].strip().lower()
        return {"jpeg": "jpg", "svg+xml": "svg"}.get(sub, sub or "bin")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Output:
        return cls(
            url=str(data.get("url") or ""),
            key=str(data.get("key") or ""),
            content_type=str(data.get("content_type") or "application/octet-stream"),
            width=_int(data.get("width")),
            height=_int(data.get("height")),
            sha256=str(data.get("sha256") or ""),
            size_bytes=_int(data.get("size_bytes"), -1),
        )


@dataclass(frozen=True)
class JobErrorInfo:
    """Why a job failed or was canceled: ``code`` (e.g. ``render_failed``, ``canceled``) and ``message``."""

    code: str
    message: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> JobErrorInfo | None:
        if not isinstance(data, Mapping):
            return None
        return cls(code=str(data.get("code") or "error"), message=str(data.get("message") or ""))


@dataclass(frozen=True)
class Job:
    """A job as ``GET /v1/jobs/{id}`` returns it.

    ``params`` are the validated request parameters (with the ``seed`` actually
    used); ``model`` is the model that renders it (the one it named, else the
    catalog's default for its operation; None from a server without models);
    ``queue_position`` is set only while ``queued``; times are aware UTC
    datetimes; ``raw`` is the JSON object the API sent.
    """

    id: str
    status: str
    operation: str
    params: dict[str, Any]
    progress: Progress
    outputs: list[Output]
    error: JobErrorInfo | None
    attempts: int
    queue_position: int | None
    created_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    urls: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)
    # the job's inputs and outputs were deleted by their retention: outputs keep their metadata, no url
    data_removed: bool = False
    model: str | None = None

    @property
    def done(self) -> bool:
        """True once the job ended (``succeeded``, ``failed`` or ``canceled``)."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def seed(self) -> int | None:
        """The seed the job was (or will be) rendered with."""
        return _opt_int(self.params.get("seed"))

    def raise_for_status(self) -> Job:
        """Return the job itself unless it ended ``failed`` or ``canceled``; then raise :class:`JobFailed`."""
        if self.status in ("failed", "canceled"):
            raise JobFailed(self)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        params = data.get("params")
        params = dict(params) if isinstance(params, Mapping) else {}
        outputs = data.get("outputs")
        urls = data.get("urls")
        return cls(
            id=str(data.get("id") or ""),
            status=str(data.get("status") or ""),
            operation=str(data.get("operation") or params.get("operation") or ""),
            params=params,
            progress=Progress.from_dict(data.get("progress")),
            outputs=[Output.from_dict(o) for o in outputs if isinstance(o, Mapping)]
            if isinstance(outputs, Sequence) else [],
            error=JobErrorInfo.from_dict(data.get("error")),
            attempts=_int(data.get("attempts")),
            queue_position=_opt_int(data.get("queue_position")),
            created_at=_parse_time(data.get("created_at")),
            started_at=_parse_time(data.get("started_at")),
            finished_at=_parse_time(data.get("finished_at")),
            urls={str(k): str(v) for k, v in urls.items()} if isinstance(urls, Mapping) else {},
            raw=dict(data),
            data_removed=bool(data.get("data_removed")),
            model=_opt_str(data.get("model")) or _opt_str(params.get("model")),
        )


@dataclass(frozen=True)
class JobPage:
    """One page of ``GET /v1/jobs``: ``jobs`` newest first, and the cursor of the next page (or None)."""

    jobs: list[Job]
    next_cursor: str | None


# -- the models (GET /v1/models) -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelState:
    """What a model's pool is doing now: render workers ready (0: its jobs wait, queued, until one
    starts), its jobs queued and running, and the median seconds of its last renders (None: none yet)."""

    workers_ready: int = 0
    queued: int = 0
    running: int = 0
    median_render_s: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelState:
        data = data if isinstance(data, Mapping) else {}
        return cls(workers_ready=_int(data.get("workers_ready")), queued=_int(data.get("queued")),
                   running=_int(data.get("running")), median_render_s=_opt_float(data.get("median_render_s")))


@dataclass(frozen=True)
class Model:
    """A model jobs may name (``model=``), as ``GET /v1/models`` lists it.

    ``operations`` are those it serves, ``default_for`` those whose jobs run on it when they name
    no model; ``defaults`` what a job that sets none gets (``steps``, ``true_cfg_scale``; None: the
    API's own); ``max_side_px`` the largest width or height it renders (None: the operation's
    limit); ``state`` its pool's live state; ``raw`` the JSON object the API sent.
    """

    name: str
    pipeline: str
    operations: list[str]
    default_for: list[str]
    defaults: dict[str, Any]
    max_side_px: int | None
    state: ModelState
    raw: dict[str, Any] = field(repr=False, compare=False)

    def serves(self, operation: str) -> bool:
        """True if jobs of ``operation`` may name this model."""
        return operation in self.operations

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Model:
        defaults = data.get("defaults")
        return cls(
            name=str(data.get("name") or ""),
            pipeline=str(data.get("pipeline") or ""),
            operations=_strings(data.get("operations")),
            default_for=_strings(data.get("default_for")),
            defaults=dict(defaults) if isinstance(defaults, Mapping) else {},
            max_side_px=_opt_int(data.get("max_side_px")),
            state=ModelState.from_dict(data.get("state")),
            raw=dict(data),
        )


# -- live events (GET /v1/jobs/{id}/events) ------------------------------------------------------


@dataclass(frozen=True)
class StatusEvent:
    """The job's full state: first on every (re)connect, then after each status change."""

    job: Job
    kind: Literal["status"] = "status"


@dataclass(frozen=True)
class ProgressEvent:
    """A denoising step finished: ``step`` of ``total``."""

    step: int
    total: int
    kind: Literal["progress"] = "progress"

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0


@dataclass(frozen=True)
class PreviewEvent:
    """A small preview image of the job in progress, at presigned ``url``."""

    url: str
    step: int | None = None
    key: str | None = None
    kind: Literal["preview"] = "preview"


@dataclass(frozen=True)
class DoneEvent:
    """The job ended; ``job`` is its final state. The stream ends after this event."""

    job: Job
    kind: Literal["done"] = "done"


#: What :meth:`Client.stream` yields.
JobEvent = StatusEvent | ProgressEvent | PreviewEvent | DoneEvent


def event_from_sse(name: str, data: Any) -> JobEvent | None:
    """The typed event of one SSE frame, or None for an event this client does not know."""
    if not isinstance(data, Mapping):
        return None
    if name == "status":
        return StatusEvent(job=Job.from_dict(data))
    if name == "done":
        return DoneEvent(job=Job.from_dict(data))
    if name == "progress":
        return ProgressEvent(step=_int(data.get("step")), total=_int(data.get("total")))
    if name == "preview" and isinstance(data.get("url"), str):
        key = data.get("key")
        return PreviewEvent(url=data["url"], step=_opt_int(data.get("step")),
                            key=key if isinstance(key, str) else None)
    return None


@dataclass(frozen=True)
class WebhookMessage:
    """A verified webhook: ``id`` (``webhook-id``; dedupe on it), ``timestamp``, ``type``
    (``job.succeeded``, ``job.failed``, ``job.canceled``, ...), ``job`` (parsed from ``data`` when
    it is a job) and the whole decoded ``payload``."""

    id: str
    timestamp: dt.datetime
    type: str
    job: Job | None
    payload: dict[str, Any]
