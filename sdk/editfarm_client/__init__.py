"""editfarm-client: a Python client for the editfarm job API.

>>> from editfarm_client import Client
>>> with Client("http://127.0.0.1:8000", api_key="...") as client:  # doctest: +SKIP
...     job = client.edit("cat.png", "give the cat a red hat", seed=7, steps=30)
...     for event in client.stream(job):
...         print(event)
...     done = client.get(job).raise_for_status()
...     print(client.download(done, "out/"))

See :class:`Client` / :class:`AsyncClient` for the calls, :mod:`editfarm_client.errors` for the
errors, and :func:`verify_webhook` for receiving webhooks.
"""

from editfarm_client._base import Box, RetryPolicy, SubmitOptions, UploadMode
from editfarm_client._uploads import ImageInput
from editfarm_client.client import AsyncClient, Client
from editfarm_client.errors import (
    APIConnectionError,
    APIError,
    BadRequest,
    Conflict,
    EditfarmError,
    IntegrityError,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    WebhookVerificationError,
)
from editfarm_client.models import (
    TERMINAL_STATUSES,
    DoneEvent,
    Job,
    JobErrorInfo,
    JobEvent,
    JobPage,
    JobStatus,
    Model,
    ModelState,
    Operation,
    Output,
    OutputFormat,
    PreviewEvent,
    Priority,
    Progress,
    ProgressEvent,
    StatusEvent,
    WebhookMessage,
)
from editfarm_client.webhooks import sign_webhook, verify_webhook

__version__ = "0.1.0"

__all__ = [
    "TERMINAL_STATUSES",
    "APIConnectionError",
    "APIError",
    "AsyncClient",
    "BadRequest",
    "Box",
    "Client",
    "Conflict",
    "DoneEvent",
    "EditfarmError",
    "ImageInput",
    "IntegrityError",
    "Job",
    "JobErrorInfo",
    "JobEvent",
    "JobFailed",
    "JobPage",
    "JobStatus",
    "Model",
    "ModelState",
    "NotFound",
    "Operation",
    "Output",
    "OutputFormat",
    "PayloadTooLarge",
    "PermissionDenied",
    "PreviewEvent",
    "Priority",
    "Progress",
    "ProgressEvent",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "StatusEvent",
    "SubmitOptions",
    "Unauthorized",
    "Unavailable",
    "UploadMode",
    "WaitTimeout",
    "WebhookMessage",
    "WebhookVerificationError",
    "__version__",
    "sign_webhook",
    "verify_webhook",
]
