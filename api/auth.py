"""API-key authentication: ``Authorization: Bearer <key>`` → tenant.

Keys come from ``EDITFARM_API_KEYS`` (``tenant:key,tenant2:key2``, for bootstrapping
and tests) and from the tenant store (``editfarm keys create``: only their SHA-256
is stored). They are compared in constant time (the env ring) or looked up by digest,
and never logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from broker.schema import ErrorCode
from broker.tenants import KEY_PREFIX

# Tenants name Redis keys and object-store prefixes, so keep them to a safe alphabet.
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ApiKeys:
    """key → tenant, matched in constant time."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        # Compare SHA-256 digests: equal lengths, so compare_digest leaks nothing about key length.
        self._entries = [(hashlib.sha256(key.encode()).digest(), tenant) for tenant, key in pairs]

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_for(self, presented: str) -> str | None:
        """The tenant owning ``presented``, or None. Checks every entry (no early exit)."""
        digest = hashlib.sha256(presented.encode()).digest()
        found: str | None = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = tenant
        return found


def parse_api_keys(raw: str) -> ApiKeys:
    """Parse ``tenant:key,tenant2:key2`` (whitespace around entries ignored).

    A tenant may have several keys. Raises ValueError naming the entry's position
    (never its key) if an entry is malformed, a tenant name is not
    ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (≤ 64 chars), or a key is used twice.
    """
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not key:
            raise ValueError(f"EDITFARM_API_KEYS entry {index} is not 'tenant:key'")
        if not TENANT_RE.match(tenant):
            raise ValueError(f"EDITFARM_API_KEYS entry {index}: tenant name has characters other than "
                             "letters, digits, '_', '.', '-' or is too long")
        if key in seen:
            raise ValueError(f"EDITFARM_API_KEYS entry {index}: key is used twice")
        seen.add(key)
        pairs.append((tenant, key))
    return ApiKeys(pairs)


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, ErrorCode.UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


async def get_api_keys(request: Request) -> ApiKeys:
    """The key ring :func:`api.app.create_app` parsed onto ``app.state.api_keys`` (``async``: no
    thread-pool hop per request)."""
    keys: ApiKeys = request.app.state.api_keys
    return keys


async def current_tenant(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    request: Request,
) -> str:
    """The tenant of the request's API key. Raises ApiError 401 unauthorized (503 if the key store
    is unreachable)."""
    if credentials is None or not credentials.credentials:
        raise _unauthorized("missing API key; send 'Authorization: Bearer <key>'")
    # called, not declared as a dependency: FastAPI's per-request dependency solving is a large share
    # of a submission's CPU (docs/performance.md, "Costs behind choices in the code")
    api_keys = await get_api_keys(request)
    tenant = api_keys.tenant_for(credentials.credentials)
    if tenant is None and credentials.credentials.startswith(KEY_PREFIX):
        tenants = request.app.state.services.tenants
        try:
            tenant = await run_in_threadpool(tenants.tenant_for_key, credentials.credentials)
        except (redis.exceptions.RedisError, OSError):
            raise ApiError(503, ErrorCode.UNAVAILABLE, "the key store is unavailable; retry later") from None
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
