"""Tenants' credentials: API keys (stored hashed) and webhook signing secrets (rotatable).

An API key is shown once, when created; Redis keeps only its SHA-256 (keys are 32 random
bytes, so a plain digest is not guessable) and a short id to list and revoke it by. A
tenant's webhook secrets are a list: after a rotation the old one stays valid for an
overlap window and messages carry signatures for both (Standard Webhooks allows several).
"""

from __future__ import annotations

import abc
import base64
import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from broker import keys

KEY_PREFIX = "ef_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class ApiKeyInfo:
    key_id: str
    tenant: str
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class WebhookSecret:
    secret: str
    created_at: float
    expires_at: float | None = None  # None: current


class TenantStore(abc.ABC):
    """Base of the credential stores."""

    def create_key(self, tenant: str) -> tuple[ApiKeyInfo, str]:
        """A new key for ``tenant``: its info and the key itself (the only time it is seen)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        info = ApiKeyInfo(key_id="key_" + secrets.token_hex(6), tenant=tenant, created_at=time.time())
        self._save_key(hash_key(key), info)
        return info, key

    @abc.abstractmethod
    def _save_key(self, digest: str, info: ApiKeyInfo) -> None: ...

    @abc.abstractmethod
    def tenant_for_key(self, key: str) -> str | None:
        """The tenant of a live key, or None (unknown or revoked)."""

    @abc.abstractmethod
    def list_keys(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        """Keys (never the keys themselves), oldest first."""

    @abc.abstractmethod
    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id; False if unknown or already revoked."""

    @abc.abstractmethod
    def webhook_secrets(self, tenant: str) -> list[WebhookSecret]:
        """All stored secrets of a tenant, newest first (expired ones included)."""

    @abc.abstractmethod
    def _save_secrets(self, tenant: str, items: list[WebhookSecret]) -> None: ...

    def signing_secrets(self, tenant: str, now: float | None = None) -> list[str]:
        """The secrets to sign a tenant's messages with now: the current one first, then any still
        inside their rotation overlap. Empty: use the deployment's EDITFARM_WEBHOOK_SECRET."""
        now = time.time() if now is None else now
        return [s.secret for s in self.webhook_secrets(tenant) if s.expires_at is None or s.expires_at > now]

    def rotate_webhook_secret(self, tenant: str, overlap_s: float = 24 * 3600) -> str:
        """Make a new current secret; the previous current one stays valid for ``overlap_s``."""
        now = time.time()
        fresh = new_webhook_secret()
        kept = [s if s.expires_at is not None else WebhookSecret(s.secret, s.created_at, now + overlap_s)
                for s in self.webhook_secrets(tenant) if s.expires_at is None or s.expires_at > now]
        self._save_secrets(tenant, [WebhookSecret(fresh, now), *kept])
        return fresh


    def retention_s(self, tenant: str) -> int | None:
        """The tenant's own job retention in seconds (None: EDITFARM_JOB_RETENTION_S applies)."""
        return None

    def set_retention_s(self, tenant: str, retention_s: int | None) -> None:
        """Set the tenant's own job retention (None: clear it)."""
        raise NotImplementedError


class RedisTenantStore(TenantStore):
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def _save_key(self, digest: str, info: ApiKeyInfo) -> None:
        pipe = self.redis.pipeline()
        pipe.set(keys.api_key(digest), json.dumps(asdict(info)))
        pipe.hset(keys.API_KEY_IDS, info.key_id, digest)
        pipe.execute()

    def _info(self, digest: str) -> ApiKeyInfo | None:
        raw = self.redis.get(keys.api_key(digest))
        return ApiKeyInfo(**json.loads(raw)) if raw else None

    def tenant_for_key(self, key: str) -> str | None:
        info = self._info(hash_key(key))
        return info.tenant if info is not None and info.revoked_at is None else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        digests: dict[Any, Any] = dict(self.redis.hgetall(keys.API_KEY_IDS))
        infos = [self._info(d.decode() if isinstance(d, bytes) else d) for d in digests.values()]
        return sorted((i for i in infos if i and (tenant is None or i.tenant == tenant)), key=lambda i: i.created_at)

    def revoke(self, key_id: str) -> bool:
        digest: Any = self.redis.hget(keys.API_KEY_IDS, key_id)
        if digest is None:
            return False
        digest = digest.decode() if isinstance(digest, bytes) else digest
        info = self._info(digest)
        if info is None or info.revoked_at is not None:
            return False
        revoked = ApiKeyInfo(info.key_id, info.tenant, info.created_at, time.time())
        self.redis.set(keys.api_key(digest), json.dumps(asdict(revoked)))
        return True

    def webhook_secrets(self, tenant: str) -> list[WebhookSecret]:
        raw = self.redis.get(keys.tenant_webhook_secrets(tenant))
        return [WebhookSecret(**item) for item in json.loads(raw)] if raw else []

    def _save_secrets(self, tenant: str, items: list[WebhookSecret]) -> None:
        self.redis.set(keys.tenant_webhook_secrets(tenant), json.dumps([asdict(i) for i in items]))

    def retention_s(self, tenant: str) -> int | None:
        raw: Any = self.redis.get(keys.tenant_retention(tenant))
        return None if raw is None else int(raw)

    def set_retention_s(self, tenant: str, retention_s: int | None) -> None:
        if retention_s is None:
            self.redis.delete(keys.tenant_retention(tenant))
        else:
            self.redis.set(keys.tenant_retention(tenant), str(retention_s))


class InMemoryTenantStore(TenantStore):
    """Dicts, for unit tests."""

    def __init__(self) -> None:
        self._keys: dict[str, ApiKeyInfo] = {}
        self._secrets: dict[str, list[WebhookSecret]] = {}
        self._retention_s: dict[str, int] = {}
        self._lock = threading.Lock()

    def _save_key(self, digest: str, info: ApiKeyInfo) -> None:
        with self._lock:
            self._keys[digest] = info

    def tenant_for_key(self, key: str) -> str | None:
        info = self._keys.get(hash_key(key))
        return info.tenant if info is not None and info.revoked_at is None else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        return sorted((i for i in self._keys.values() if tenant is None or i.tenant == tenant),
                      key=lambda i: i.created_at)

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            for digest, info in self._keys.items():
                if info.key_id == key_id and info.revoked_at is None:
                    self._keys[digest] = ApiKeyInfo(info.key_id, info.tenant, info.created_at, time.time())
                    return True
        return False

    def webhook_secrets(self, tenant: str) -> list[WebhookSecret]:
        return list(self._secrets.get(tenant, []))

    def _save_secrets(self, tenant: str, items: list[WebhookSecret]) -> None:
        with self._lock:
            self._secrets[tenant] = list(items)

    def retention_s(self, tenant: str) -> int | None:
        return self._retention_s.get(tenant)

    def set_retention_s(self, tenant: str, retention_s: int | None) -> None:
        with self._lock:
            if retention_s is None:
                self._retention_s.pop(tenant, None)
            else:
                self._retention_s[tenant] = retention_s
