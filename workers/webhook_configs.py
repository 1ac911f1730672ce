"""Webhook delivery settings per tenant: the deployment's, signed with the tenant's own (rotated)
secrets when it has some, each cached for a few seconds per process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from workers.settings import WorkerSettings
from workers.webhooks import WebhookConfig

# A tenant's signing secrets are read from Redis at most once per this many seconds per process,
# not on every delivery attempt: a rotation (`editfarm secrets rotate`) reaches deliveries within
# this delay, during which messages carry the previous secret's signature only (still valid: a
# rotation keeps the previous secret through its overlap, 24 h by default).
WEBHOOK_CONFIG_CACHE_S = 5.0

# tenants come and go: the cache is emptied when it holds more than this many
_MAX_CACHED = 10_000


class SigningSecrets(Protocol):
    def signing_secrets(self, tenant: str) -> list[str]: ...


class WebhookConfigs:
    """``configs(tenant)`` → the :class:`WebhookConfig` to deliver ``tenant``'s messages with."""

    def __init__(self, *, settings: WorkerSettings, tenants: SigningSecrets,
                 clock: Callable[[], float] = time.monotonic, cache_s: float = WEBHOOK_CONFIG_CACHE_S) -> None:
        self.settings, self.tenants, self.clock, self.cache_s = settings, tenants, clock, cache_s
        self._cached: dict[str, tuple[float, WebhookConfig]] = {}  # tenant ("": none) → (expires, config)

    def __call__(self, tenant: str | None = None) -> WebhookConfig:
        """Cached for ``cache_s`` (see WEBHOOK_CONFIG_CACHE_S). Raises redis.RedisError."""
        now = self.clock()
        cached = self._cached.get(tenant or "")
        if cached is not None and now < cached[0]:
            return cached[1]
        s = self.settings
        secrets = [s.webhook_secret.get_secret_value()] if s.webhook_secret else []
        if tenant:
            secrets = self.tenants.signing_secrets(tenant) or secrets
        config = WebhookConfig(secrets=secrets, timeout_s=s.webhook_timeout_s,
                               max_attempts=len(s.webhook_retry_schedule_s),
                               retry_schedule_s=tuple(s.webhook_retry_schedule_s),
                               allow_private=s.webhook_allow_private, allow_http=s.webhook_allow_http)
        if len(self._cached) > _MAX_CACHED:
            self._cached.clear()
        self._cached[tenant or ""] = (now + self.cache_s, config)
        return config
