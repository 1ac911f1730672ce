"""``Idempotency-Key`` on ``POST /v1/jobs``: a retried submission returns the job it already made.

Per tenant and key (``keys.idempotency``) the store keeps ``"<request sha256> <job id>"`` for
``EDITFARM_IDEMPOTENCY_TTL_S`` (24 h). The flow, race-safe across API replicas:

1. after the body is parsed, ``SET NX`` a ``"<sha256> pending:<token>"`` marker (TTL
   :data:`PENDING_TTL_S`, so a crashed request frees its key);
2. the key exists with another body → 409 ``idempotency_conflict``; with this body and a job → 200
   and that job as it is now (``Idempotent-Replayed: true``); still pending → wait up to
   :data:`IN_PROGRESS_WAIT_S`, then 409 ``idempotency_in_progress`` (``Retry-After: 1``);
3. the marker becomes ``"<sha256> <job id>"`` in the job store's create itself, in the same atomic
   step that records and queues the job (:mod:`broker.jobstore.claim`; on Redis): the key and its
   job exist together or not at all, one ``WAIT`` confirms both on the replicas
   (``EDITFARM_REDIS_MIN_REPLICAS``), and a create whose reply was lost (the connection dropped)
   leaves the key naming the job it made. Any other end of the request (a 4xx, a 503, an
   exception) deletes the marker if it still is this request's, so a key never points at a job
   that does not exist and the client may retry with the same key; a delete that found the store
   unreachable is retried in the background until the marker would have expired. A key whose job
   has expired is free again.

The request hash covers the parsed fields and every image source (file parts and data URLs by
their SHA-256), not the raw bytes: a multipart body re-sent with a new boundary, or JSON with
other whitespace or key order, is the same request. Only the compare-and-set writes need Lua.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import anyio
import redis
from fastapi import Header
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.errors import STORE_ERRORS, ApiError, ErrorResponse, store_unavailable
from api.models import JobOut
from broker import keys, scripts
from broker.jobstore import KeyClaim
from broker.replication import ReplicaShortfall
from broker.schema import ErrorCode, Job

logger = logging.getLogger("editfarm.api")

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# printable ASCII; no leading or trailing space (HTTP strips those anyway)
KEY_PATTERN = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"
_KEY_RE = re.compile(KEY_PATTERN)
PENDING_TTL_S = 300  # longer than any submission (image URL fetches, uploads)
IN_PROGRESS_WAIT_S = 2.0
_POLL_S = 0.05
_PENDING = "pending:"


# -- storage ----------------------------------------------------------------------------------------


class IdempotencyStore(abc.ABC):
    """Per (tenant, key) one string value with a TTL; blocking, raises the backend's errors."""

    @abc.abstractmethod
    def reserve(self, tenant: str, key: str, value: str, ttl_s: int) -> str | None:
        """Store ``value`` if the key is free and return None; else return the stored value unchanged."""

    @abc.abstractmethod
    def swap(self, tenant: str, key: str, expected: str, value: str | None, ttl_s: int) -> bool:
        """If the key holds ``expected``, replace it with ``value`` (None: delete it); else change nothing."""

    def key_claim(self, tenant: str, key: str, held: str, done: str, ttl_s: int) -> KeyClaim | None:
        """The key as the job store's create points it (``held`` → ``done``), when the job store holds
        these keys too; None (this default): the caller swaps it after the create."""
        return None


class RedisIdempotencyStore(IdempotencyStore):
    def __init__(self, client: redis.Redis) -> None:
        self._reserve = client.register_script(scripts.source("idempotency_reserve"))
        self._swap = client.register_script(scripts.source("idempotency_swap"))

    def reserve(self, tenant: str, key: str, value: str, ttl_s: int) -> str | None:
        current = self._reserve(keys=[keys.idempotency(tenant, key)], args=[value, ttl_s])
        if current is None:
            return None
        return current.decode() if isinstance(current, bytes) else str(current)

    def swap(self, tenant: str, key: str, expected: str, value: str | None, ttl_s: int) -> bool:
        return bool(self._swap(keys=[keys.idempotency(tenant, key)], args=[expected, value or "", ttl_s]))

    def key_claim(self, tenant: str, key: str, held: str, done: str, ttl_s: int) -> KeyClaim | None:
        # the job store is on the same Redis (one EDITFARM_REDIS_URL): its create script sets the key
        return KeyClaim(key=keys.idempotency(tenant, key), held=held, done=done, ttl_s=ttl_s)


class InMemoryIdempotencyStore(IdempotencyStore):
    """Process-local twin (unit tests, fake services); TTLs by wall clock."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self.values: dict[tuple[str, str], tuple[str, float]] = {}

    def _get(self, slot: tuple[str, str]) -> str | None:
        entry = self.values.get(slot)
        if entry is None:
            return None
        if entry[1] <= time.time():
            del self.values[slot]
            return None
        return entry[0]

    def reserve(self, tenant: str, key: str, value: str, ttl_s: int) -> str | None:
        with self._mu:
            current = self._get((tenant, key))
            if current is None:
                self.values[(tenant, key)] = (value, time.time() + ttl_s)
            return current

    def swap(self, tenant: str, key: str, expected: str, value: str | None, ttl_s: int) -> bool:
        with self._mu:
            if self._get((tenant, key)) != expected:
                return False
            if value is None:
                del self.values[(tenant, key)]
            else:
                self.values[(tenant, key)] = (value, time.time() + ttl_s)
            return True


# -- the request hash -------------------------------------------------------------------------------


def _canonical(value: Any, blobs: bool = False) -> Any:
    """JSON-able form of a parsed body: bytes (and, for image sources, strings) by their SHA-256."""
    if isinstance(value, bytes):
        return {"bytes": hashlib.sha256(value).hexdigest()}
    if isinstance(value, str) and blobs:
        return {"text": hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name), True) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v, blobs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, blobs) for v in value]
    return value


def request_digest(fields: dict[str, Any], sources: Any) -> str:
    """SHA-256 hex of the parsed submission: its fields and its image sources (a dataclass)."""
    text = json.dumps({"fields": _canonical(fields), "sources": _canonical(sources, True)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


# -- the route's side -------------------------------------------------------------------------------


def _unavailable() -> ApiError:
    return ApiError(503, ErrorCode.UNAVAILABLE, "the idempotency store is unavailable; retry later")


_RELEASE_RETRY_MAX_S = 5.0
# the background releases in flight (the event loop keeps only weak references to tasks)
_RELEASING: set[asyncio.Task[None]] = set()


async def _release_later(store: IdempotencyStore, tenant: str, key: str, held: str, until: float) -> None:
    """Delete the marker ``held`` once the store answers again (a failover: seconds), until the marker
    would have expired anyway; retrying a key meanwhile answers 409 ``idempotency_in_progress``."""
    delay_s = 0.5
    while time.monotonic() < until:
        await anyio.sleep(delay_s)
        try:
            await run_in_threadpool(store.swap, tenant, key, held, None, 0)
            logger.info("released an %s once the store answered again", HEADER)
            return
        except STORE_ERRORS:
            delay_s = min(delay_s * 2, _RELEASE_RETRY_MAX_S)


class IdempotencyScope:
    """One submission's use of its Idempotency-Key (all no-ops without the header)."""

    def __init__(self, services: Any, tenant: str, key: str | None) -> None:
        self.services, self.tenant, self.key = services, tenant, key
        self._held: str | None = None  # our pending marker while we own the key
        self._held_at = 0.0  # when it was set (monotonic s)

    @property
    def to_release(self) -> bool:
        """Whether :meth:`release` has anything to do (the submission's ``finally`` skips it if not)."""
        return self._held is not None

    async def claim(self, fields: dict[str, Any], sources: Any,
                    render: Callable[[Job], dict[str, Any]]) -> JSONResponse | None:
        """Own the key for this request (None: go on and create the job), or the response to return:
        200 with the job an earlier identical request made (``render`` builds its view; blocking).

        Raises ApiError 409 idempotency_conflict / idempotency_in_progress, 503 (``store_unavailable``:
        the replayed job is not yet on enough replicas).
        """
        if self.key is None:
            return None
        store: IdempotencyStore = self.services.idempotency
        digest = request_digest(fields, sources)
        pending = f"{digest} {_PENDING}{secrets.token_hex(8)}"
        deadline = time.monotonic() + IN_PROGRESS_WAIT_S
        try:
            while True:
                current = await run_in_threadpool(store.reserve, self.tenant, self.key, pending, PENDING_TTL_S)
                if current is None:
                    self._held, self._held_at = pending, time.monotonic()
                    return None
                stored_digest, _, ref = current.partition(" ")
                if stored_digest != digest:
                    raise ApiError(409, ErrorCode.IDEMPOTENCY_CONFLICT,
                                   f"this {HEADER} was used with a different request body; use a new key "
                                   "for a new request", param=HEADER)
                if ref.startswith(_PENDING):
                    if time.monotonic() < deadline:
                        await anyio.sleep(_POLL_S)
                        continue
                    raise ApiError(409, ErrorCode.IDEMPOTENCY_IN_PROGRESS,
                                   f"a request with this {HEADER} is still being processed; retry shortly",
                                   param=HEADER, headers={"Retry-After": "1"})
                job = await run_in_threadpool(self.services.store.get_for_tenant, ref, self.tenant)
                if job is None:  # its job expired: the key is free again
                    if await run_in_threadpool(store.swap, self.tenant, self.key, current, pending,
                                               PENDING_TTL_S):
                        self._held, self._held_at = pending, time.monotonic()
                        return None
                    continue
                try:  # a job answered 503 store_unavailable before: replayed once replicas hold it
                    await run_in_threadpool(self.services.store.confirm_replicated, job.id)
                except ReplicaShortfall:
                    raise store_unavailable() from None
                view = await run_in_threadpool(render, job)
                logger.info("replayed %s for tenant %s (%s)", job.id, self.tenant, HEADER)
                return JSONResponse(view, status_code=200, headers={
                    "Location": view["urls"]["self"], "Cache-Control": "no-store", "Idempotent-Replayed": "true"})
        except STORE_ERRORS as exc:
            logger.warning("idempotency store unavailable: %s", type(exc).__name__)
            raise _unavailable() from None

    def key_claim(self, job_id: str) -> KeyClaim | None:
        """The key for the job store's create of ``job_id`` to point at it in the same atomic step;
        None without a key held, or when the idempotency store is not the job store's (then
        :meth:`complete` after the create)."""
        if self._held is None:
            return None
        done = f"{self._held.partition(' ')[0]} {job_id}"
        return self.services.idempotency.key_claim(self.tenant, self.key, self._held, done,
                                                  self.services.settings.idempotency_ttl_s)

    def pointed(self) -> None:
        """The create given :meth:`key_claim` settled the key (pointed it at its job, or freed it with
        a withdrawn job): nothing is left to do."""
        self._held = None

    async def complete(self, job_id: str) -> None:
        """Point the key at ``job_id`` (once the job is stored and queued), where the create did not
        (:meth:`key_claim` was None). Never raises: the job is accepted either way; on failure the
        marker expires and the key is free again."""
        if self._held is None:
            return
        held, self._held = self._held, None
        done = f"{held.partition(' ')[0]} {job_id}"
        ttl = self.services.settings.idempotency_ttl_s
        try:
            if not await run_in_threadpool(self.services.idempotency.swap, self.tenant, self.key, held, done, ttl):
                logger.warning("%s of %s: the pending marker was gone (request slower than %d s)",
                               HEADER, job_id, PENDING_TTL_S)
        except STORE_ERRORS as exc:
            logger.warning("could not record the %s of %s: %s", HEADER, job_id, type(exc).__name__)

    async def release(self) -> None:
        """Free the key if this request still holds it unfinished (it ended without a job)."""
        if self._held is None or self.key is None:
            return
        held, self._held = self._held, None
        store: IdempotencyStore = self.services.idempotency
        try:
            # only if still ours: a create whose reply was lost may have pointed the key at its job
            await run_in_threadpool(store.swap, self.tenant, self.key, held, None, 0)
        except STORE_ERRORS as exc:
            logger.warning("could not release an %s: %s; retrying in the background", HEADER, type(exc).__name__)
            task = asyncio.get_running_loop().create_task(
                _release_later(store, self.tenant, self.key, held, self._held_at + PENDING_TTL_S))
            _RELEASING.add(task)
            task.add_done_callback(_RELEASING.discard)


def check_key(key: str | None) -> str | None:
    """The header's value, or None without one. Raises ApiError 422 invalid_parameter if it is malformed."""
    if key is None:
        return None
    if len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key):
        raise ApiError(422, ErrorCode.INVALID_PARAMETER,
                       f"{HEADER} must be 1..{MAX_KEY_LENGTH} printable ASCII characters", param=HEADER)
    return key


IdempotencyKeyHeader = Annotated[str | None, Header(
    alias=HEADER,
    description="Makes the submission safe to retry: the same key (per tenant) with the same body "
                "within 24 h returns the job the first request made (200) instead of a new one; with "
                "another body it is 409 idempotency_conflict. 1..255 printable ASCII characters.",
    json_schema_extra={"maxLength": MAX_KEY_LENGTH, "minLength": 1, "pattern": KEY_PATTERN},
)]
"""The ``Idempotency-Key`` request header, as a route or dependency parameter (default None)."""


IDEMPOTENCY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": JobOut, "description": f"Replayed: the job an earlier request with this {HEADER} and "
                                         "the same body made, as it is now (`Idempotent-Replayed: true`)."},
    409: {"model": ErrorResponse, "description": "idempotency_conflict (the key was used with another body) / "
                                                 "idempotency_in_progress (its first request still runs)"},
}
