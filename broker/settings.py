"""Settings every deployable shares (``EDITFARM_`` environment variables).

Each deployable has its own settings class built on this one (see
``api/settings.py`` and ``workers/settings.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.replication import ReplicaPolicy


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDITFARM_", env_file=None, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # a job is accepted (202) and ended only once this many replicas hold the write (Redis WAIT);
    # 0: one Redis, no WAIT sent. The wait is bounded by redis_wait_timeout_ms, which must stay
    # below the Redis clients' socket timeouts (10 s in the API)
    redis_min_replicas: int = Field(default=0, ge=0)
    redis_wait_timeout_ms: int = Field(default=1000, gt=0, le=8000)
    # Celery redelivers a message unacked for longer than this (celery #5935), so it
    # must exceed the longest job; the JobStore lease is what prevents double runs.
    visibility_timeout_s: int = 12 * 3600
    # how often workers sweep for messages unacked past the visibility timeout; None: kombu's default
    unacked_restore_interval_s: int | None = None

    s3_endpoint_url: str | None = None
    s3_bucket: str = "editfarm"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_path_style: bool = True
    presign_expiry_s: int = 24 * 3600

    # a finished job leaves Redis this long after it ended (a tenant may have its own, a job a shorter one)
    job_retention_s: int = 7 * 24 * 3600
    # before that, its record goes to tenants/<t>/jobs/<id>/job.json, where GET /v1/jobs/{id} finds it
    archive_jobs: bool = False
    # a job's inputs, previews and outputs are deleted this many days after it ended (the bucket's
    # lifecycle rule, `editfarm storage lifecycle apply`); 0: kept forever
    object_retention_days: int = 0

    webhook_secret: SecretStr | None = None
    model: str = ""
    # the model catalog (YAML, see docs/models.md); EDITFARM_MODEL alone is a one-model catalog
    models_file: str = ""
    # LoRA files (a job's `loras`) may come from s3://<s3_bucket>/... and, besides, from these
    # buckets (comma-separated), read with the same credentials
    lora_buckets: str = ""

    def replica_policy(self, on_shortfall: Callable[[str, int], None] | None = None) -> ReplicaPolicy:
        """The job store's :class:`~broker.replication.ReplicaPolicy` (``on_shortfall``: a metric)."""
        if on_shortfall is None:
            return ReplicaPolicy(min_replicas=self.redis_min_replicas, wait_timeout_ms=self.redis_wait_timeout_ms)
        return ReplicaPolicy(min_replicas=self.redis_min_replicas, wait_timeout_ms=self.redis_wait_timeout_ms,
                             on_shortfall=on_shortfall)

    def lora_bucket_list(self) -> list[str]:
        """The buckets besides ``s3_bucket`` that LoRA uris may name."""
        return [b.strip() for b in self.lora_buckets.split(",") if b.strip()]
