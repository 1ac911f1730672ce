"""The job store: the one source of truth about jobs.

Every change of a job is a compare-and-set: it happens only if the job's
current fields match what the caller expects (for example ``status`` is
``queued``), so two workers can never both start a job and a finished job can
never go back to running. :class:`RedisJobStore` does this in one Lua script;
:class:`InMemoryJobStore` is the small stand-in for unit tests.
"""

from __future__ import annotations

import abc
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from broker import keys
from broker.schema import Job, JobStatus, dump_fields, sources_of

Expect = Mapping[str, Iterable[Any]]
"""field name → the values it may have for the change to apply."""


class JobStore(abc.ABC):
    """Base of all job stores."""

    @abc.abstractmethod
    def create(self, job: Job) -> None:
        """Save a new job. Raises ``KeyError`` if the id is taken."""

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The job, or None if unknown."""

    @abc.abstractmethod
    def compare_and_set(self, job_id: str, expect: Expect, fields: Mapping[str, Any]) -> bool:
        """Set ``fields`` if every field in ``expect`` has one of its listed values.

        Returns False (and changes nothing) if the job is unknown or a check fails.
        """

    @abc.abstractmethod
    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        """A tenant's job ids, newest first."""

    def get_for_tenant(self, job_id: str, tenant: str) -> Job | None:
        """The job if it exists and belongs to ``tenant``; otherwise None (never reveal others' jobs)."""
        job = self.get(job_id)
        return job if job is not None and job.tenant == tenant else None

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        fields: Mapping[str, Any] | None = None,
        *,
        from_: Iterable[JobStatus] | None = None,
        expect: Expect | None = None,
    ) -> Job | None:
        """Move a job to ``to`` atomically; returns the new job, or None if the move was not legal now.

        ``from_`` narrows the legal source statuses; ``expect`` adds other checks
        (for example that ``worker`` is still the caller).
        """
        sources = set(sources_of(to)) if from_ is None else set(from_) & sources_of(to)
        checks: dict[str, list[Any]] = {"status": [s.value for s in sources]}
        for name, values in (expect or {}).items():
            checks[name] = list(values)
        changes = {"status": to.value, **(fields or {})}
        if not self.compare_and_set(job_id, checks, changes):
            return None
        return self.get(job_id)


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _decode_job(raw: Mapping[Any, Any]) -> Job:
    data = {
        (k.decode() if isinstance(k, bytes) else k): json.loads(v)
        for k, v in raw.items()
    }
    return Job.model_validate(data)


# KEYS[1] = job hash. ARGV = n_checks, then per check: field, n_values, values...,
# then field/value pairs to set. Values are JSON-encoded by the caller, so the
# script compares and stores strings and never needs cjson.
_CAS_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local field = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local current = redis.call('HGET', KEYS[1], field)
  if current == false then current = 'null' end
  local ok = false
  for j = i + 2, i + 1 + n do
    if ARGV[j] == current then ok = true end
  end
  if not ok then return 0 end
  i = i + 2 + n
end
if i <= #ARGV then
  redis.call('HSET', KEYS[1], unpack(ARGV, i, #ARGV))
end
return 1
"""

_CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3, #ARGV))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


class RedisJobStore(JobStore):
    """Jobs as Redis hashes (one JSON-encoded field per attribute) with Lua compare-and-set."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._cas = client.register_script(_CAS_SCRIPT)
        self._create = client.register_script(_CREATE_SCRIPT)

    def create(self, job: Job) -> None:
        flat: list[str] = []
        for name, value in dump_fields(job).items():
            flat += [name, _encode(value)]
        created = self._create(
            keys=[keys.job(job.id), keys.tenant_jobs(job.tenant)],
            args=[repr(job.created_at), job.id, *flat],
        )
        if not created:
            raise KeyError(f"job {job.id} already exists")

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return _decode_job(raw) if raw else None

    def compare_and_set(self, job_id: str, expect: Expect, fields: Mapping[str, Any]) -> bool:
        args: list[Any] = [len(expect)]
        for name, values in expect.items():
            encoded = [_encode(v) for v in values]
            args += [name, len(encoded), *encoded]
        for name, value in fields.items():
            args += [name, _encode(value)]
        return bool(self._cas(keys=[keys.job(job_id)], args=args))

    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        ids: list[Any] = list(self.redis.zrevrange(keys.tenant_jobs(tenant), offset, offset + limit - 1))
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


class InMemoryJobStore(JobStore):
    """A thread-safe dict-backed store with the same semantics, for unit tests."""

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def create(self, job: Job) -> None:
        with self._lock:
            if job.id in self._jobs:
                raise KeyError(f"job {job.id} already exists")
            self._jobs[job.id] = {k: _encode(v) for k, v in dump_fields(job).items()}

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            raw = self._jobs.get(job_id)
            return _decode_job(dict(raw)) if raw else None

    def compare_and_set(self, job_id: str, expect: Expect, fields: Mapping[str, Any]) -> bool:
        with self._lock:
            raw = self._jobs.get(job_id)
            if raw is None:
                return False
            for name, values in expect.items():
                if raw.get(name, "null") not in {_encode(v) for v in values}:
                    return False
            raw.update({k: _encode(v) for k, v in fields.items()})
            return True

    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        with self._lock:
            jobs = [(json.loads(r["created_at"]), i) for i, r in self._jobs.items()
                    if json.loads(r["tenant"]) == tenant]
        jobs.sort(reverse=True)
        return [i for _, i in jobs[offset:offset + limit]]
