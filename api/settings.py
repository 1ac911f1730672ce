"""Settings of the API process (``EDITFARM_`` environment variables)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from broker.schema import MAX_BOXES, MAX_REFERENCE_IMAGES
from broker.settings import ClusterSettings
from storage.store import S3Config

MIB = 1024 * 1024
MAX_PROMPT_CHARS = 4000  # the job schema's max_length of prompt and negative_prompt


class ApiSettings(ClusterSettings):
    """Everything the API reads from its environment.

    ``api_keys`` is ``tenant:key,tenant2:key2`` (``EDITFARM_API_KEYS``); it is
    parsed and checked by :func:`api.auth.parse_api_keys` when the app is built,
    so a malformed value fails at startup without the keys ever being printed.
    """

    api_keys: SecretStr = SecretStr("")
    # prefix of urls.self / urls.cancel / Location; empty → the request's own base URL
    public_base_url: str = ""

    max_body_bytes: int = Field(default=40 * MIB, gt=0)
    max_image_bytes: int = Field(default=25 * MIB, gt=0)
    # width*height, checked from the image header before any pixel is decoded
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_image_side_px: int = Field(default=8192, gt=0)
    # prompt and negative_prompt, in characters (the job schema's hard cap is 4000)
    max_prompt_chars: int = Field(default=MAX_PROMPT_CHARS, ge=1, le=MAX_PROMPT_CHARS)
    # edit's reference images and inpaint's boxes (the job schema's hard caps are 3 and 16)
    max_reference_images: int = Field(default=MAX_REFERENCE_IMAGES, ge=0, le=MAX_REFERENCE_IMAGES)
    max_boxes: int = Field(default=MAX_BOXES, ge=0, le=MAX_BOXES)
    # submissions with a body of 1 MiB or more (uploads, data URLs) read and validated at once, per
    # API process; the others wait for a slot once their bytes arrive (bounds the API's memory)
    max_concurrent_uploads: int = Field(default=2, ge=1)
    # of those, held by one tenant at once; 0 = all but one, so one tenant never holds every slot
    max_concurrent_uploads_per_tenant: int = Field(default=0, ge=0)
    # a request body must arrive within body_timeout_s, plus 1 s per body_min_bytes_per_s bytes
    # received, and within body_max_s of the request in all: else 408 request_timeout and the
    # connection is closed (slow senders hold neither a slot nor a connection for long)
    body_timeout_s: float = Field(default=10.0, gt=0)
    body_min_bytes_per_s: int = Field(default=32 * 1024, gt=0)
    body_max_s: float = Field(default=120.0, gt=0)
    # glibc: buffers of this size or more are mmapped and given back when freed (see api/malloc.py);
    # 0 leaves glibc's dynamic threshold (the API process then keeps its upload peak)
    malloc_mmap_threshold_bytes: int = Field(default=256 * 1024, ge=0, le=32 * MIB)

    # per tenant: POST /v1/jobs per minute (sliding window in Redis) and jobs queued or running; 0 = off
    rate_limit_per_min: int = Field(default=600, ge=0)
    max_jobs_in_flight: int = Field(default=1000, ge=0)
    # how long POST /v1/jobs remembers an Idempotency-Key (per tenant)
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)

    # input-image URLs and webhooks: https to public addresses only, unless these are set
    # (local development and tests); cloud metadata addresses stay refused either way.
    allow_private_urls: bool = False
    allow_http_urls: bool = False
    url_fetch_timeout_s: float = Field(default=15.0, gt=0)

    # GET /v1/jobs/{id}/events (Server-Sent Events)
    sse_progress_interval_s: float = Field(default=0.2, ge=0)  # at most one progress event per interval
    sse_keepalive_s: float = Field(default=15.0, gt=0)  # ": ping" comment when nothing else was sent
    sse_retry_ms: int = Field(default=3000, ge=0)  # the reconnect delay the stream tells clients
    sse_max_duration_s: float = Field(default=3600.0, gt=0)  # a stream then ends; clients reconnect

    # GET /metrics reads queue depth from the job store; a scrape waits at most this long for it
    metrics_store_timeout_s: float = Field(default=2.0, gt=0)

    host: str = "127.0.0.1"
    port: int = 8000

    def uploads_per_tenant(self) -> int:
        """Upload slots one tenant may hold at once (see ``max_concurrent_uploads_per_tenant``)."""
        return self.max_concurrent_uploads_per_tenant or max(1, self.max_concurrent_uploads - 1)

    def s3_config(self) -> S3Config:
        """The object-store configuration these settings describe."""
        secret = self.s3_secret_access_key
        return S3Config(
            bucket=self.s3_bucket,
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            path_style=self.s3_path_style,
        )
