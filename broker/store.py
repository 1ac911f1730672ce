"""The job store: the one source of truth about jobs.

Every change of a job is a compare-and-set: it happens only if the job's
current fields match what the caller expects (for example ``status`` is
``queued``), so two workers can never both start a job and a finished job can
never go back to running. :class:`RedisJobStore` does this in one Lua script;
:class:`InMemoryJobStore` is the small stand-in for unit tests.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from broker import keys
from broker.schema import (
    PRIORITY_ORDER,
    Job,
    JobStatus,
    Priority,
    dump_fields,
    queue_deadline_at,
    sources_of,
)

Expect = Mapping[str, Iterable[Any]]
"""field name → the values it may have for the change to apply."""


class JobStore(abc.ABC):
    """Base of all job stores."""

    @abc.abstractmethod
    def create(self, job: Job) -> None:
        """Save a new job. Raises ``KeyError`` if the id is taken."""

    @abc.abstractmethod
    def create_and_enqueue(self, job: Job, queue: str, message: str) -> int | None:
        """Save a new queued job and push its broker ``message`` onto the list ``queue``, atomically:
        both or neither (a job never exists without its message). Returns the job's queue position
        (see :meth:`queue_position`). Raises ``KeyError`` if the id is taken (nothing is pushed)."""

    async def create_and_enqueue_async(self, job: Job, queue: str, message: str) -> int | None:
        """:meth:`create_and_enqueue` for the event loop (this default runs it in a thread)."""
        return await asyncio.to_thread(self.create_and_enqueue, job, queue, message)

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

    @abc.abstractmethod
    def queue_position(self, job_id: str) -> int | None:
        """0-based place of a queued job in the strict-priority render order; None if not queued."""

    @abc.abstractmethod
    def queued_count(self, priority: Priority) -> int:
        """Jobs queued at ``priority``."""

    @abc.abstractmethod
    def running_count(self) -> int:
        """Jobs running now."""

    @abc.abstractmethod
    def tenant_active_count(self, tenant: str) -> int:
        """A tenant's jobs queued or running now (the in-flight cap)."""

    @abc.abstractmethod
    def lapsed_leases(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Running jobs whose lease ended before ``now`` (epoch s), as (job id, lease_until)."""

    @abc.abstractmethod
    def overdue_queued(self, now: float, limit: int = 100) -> list[str]:
        """Queued jobs whose queue deadline passed before ``now`` (epoch s)."""

    def tenant_job_ids_before(
        self, tenant: str, before: tuple[float, str] | None, limit: int = 50,
    ) -> list[tuple[str, float]]:
        """Up to ``limit`` of a tenant's jobs as ``(job id, created_at)``, newest first, starting
        strictly after the position ``before = (created_at, job id)`` in that order (None: the newest).

        A cursor that stays valid while new jobs arrive. This default reads every
        job; stores override it.
        """
        rows: list[tuple[str, float]] = []
        offset = 0
        while True:
            ids = self.tenant_job_ids(tenant, offset, 200)
            if not ids:
                break
            offset += len(ids)
            for job_id in ids:
                job = self.get(job_id)
                if job is not None and (before is None or (job.created_at, job_id) < before):
                    rows.append((job_id, job.created_at))
        rows.sort(key=lambda r: (r[1], r[0]), reverse=True)
        return rows[:limit]

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
        push: tuple[str, str] | None = None,
    ) -> Job | None:
        """Move a job to ``to`` atomically; returns the new job, or None if the move was not legal now.

        ``from_`` narrows the legal source statuses; ``expect`` adds other checks
        (for example that ``worker`` is still the caller). ``push``: a ``(list, message)`` to LPUSH
        in the same atomic step, only if the move happens (a Celery message that must go with it).
        """
        checks, changes = _transition_checks(to, fields, from_, expect)
        with self._push_lock():
            if not self.compare_and_set(job_id, checks, changes):
                return None
            if push is not None:
                self._push(*push)
        return self.get(job_id)

    def _push_lock(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _push(self, queue: str, message: str) -> None:
        raise NotImplementedError("this store cannot push messages")


def _transition_checks(to: JobStatus, fields: Mapping[str, Any] | None, from_: Iterable[JobStatus] | None,
                       expect: Expect | None) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """A transition's compare-and-set: the legal source statuses and ``expect``; the fields to set."""
    sources = set(sources_of(to)) if from_ is None else set(from_) & sources_of(to)
    checks: dict[str, list[Any]] = {"status": [s.value for s in sources]}
    for name, values in (expect or {}).items():
        checks[name] = list(values)
    return checks, {"status": to.value, **(fields or {})}


# json.dumps with these arguments builds a new encoder per call (~1.5 µs, ~25 calls per job)
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
_encode_str: Any = getattr(json.encoder, "c_encode_basestring_ascii", None) or json.encoder.encode_basestring_ascii


def _encode(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"), sort_keys=True)``; strings, None and ints (most of
    a job's fields) without going through the encoder object (~1 µs each)."""
    kind = type(value)
    if kind is str:
        return str(_encode_str(value))
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    return _ENCODER.encode(value)


def _cas_args(expect: Expect, fields: Mapping[str, Any]) -> list[Any]:
    """The compare-and-set part of a script's ARGV (see _CHECKS): the checks, then field/value pairs."""
    args: list[Any] = [len(expect)]
    for name, values in expect.items():
        encoded = [_encode(v) for v in values]
        args += [name, len(encoded), *encoded]
    for name, value in fields.items():
        args += [name, _encode(value)]
    return args


def _decode_job(raw: Mapping[Any, Any]) -> Job:
    data = {
        (k.decode() if isinstance(k, bytes) else k): json.loads(v)
        for k, v in raw.items()
    }
    return Job.model_validate(data)


# Keeps the index sets in step with the job hash, in the same atomic script:
# queued:<priority> (queue position), deadlines, running (lease_until) and the
# inflight list that KEDA counts. KEYS[1] is the job hash, KEYS[2..7] the
# indexes in _INDEX_KEYS order, ARGV[1] the job id.
_REINDEX = """
local ARGV_PREFIX = '""" + keys.PREFIX + """'
local function reindex(id)
  local status = redis.call('HGET', KEYS[1], 'status')
  for i = 2, 4 do redis.call('ZREM', KEYS[i], id) end
  redis.call('ZREM', KEYS[7], id)
  if status == '"queued"' then
    local params = cjson.decode(redis.call('HGET', KEYS[1], 'params'))
    local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
    local slot = ({high = 2, normal = 3, low = 4})[params['priority']] or 3
    redis.call('ZADD', KEYS[slot], created, id)
    local deadline = params['queue_deadline_s']
    if type(deadline) == 'number' then redis.call('ZADD', KEYS[7], created + deadline, id) end
  end
  if status == '"running"' then
    redis.call('ZADD', KEYS[5], tonumber(redis.call('HGET', KEYS[1], 'lease_until')) or 0, id)
    if not redis.call('LPOS', KEYS[6], id) then redis.call('LPUSH', KEYS[6], id) end
  else
    redis.call('ZREM', KEYS[5], id)
    redis.call('LREM', KEYS[6], 0, id)
  end
  -- the tenant's in-flight set (derived from the hash, so not in KEYS: single-node Redis only)
  local active = ARGV_PREFIX .. 'tenant:' .. cjson.decode(redis.call('HGET', KEYS[1], 'tenant')) .. ':active'
  if status == '"queued"' or status == '"running"' then
    redis.call('SADD', active, id)
  else
    redis.call('SREM', active, id)
  end
end
"""

# ARGV[first] = n_checks, then per check: field, n_values, values... Values are JSON-encoded by
# the caller, so the checks compare strings. Returns the index after the checks, or nil if one fails.
_CHECKS = """
local function checks_hold(first)
  local i = first + 1
  for _ = 1, tonumber(ARGV[first]) do
    local field = ARGV[i]
    local n = tonumber(ARGV[i + 1])
    local current = redis.call('HGET', KEYS[1], field)
    if current == false then current = 'null' end
    local ok = false
    for j = i + 2, i + 1 + n do
      if ARGV[j] == current then ok = true end
    end
    if not ok then return nil end
    i = i + 2 + n
  end
  return i
end
"""

# ARGV = id, then the checks (see _CHECKS), then field/value pairs to set.
_CAS_SCRIPT = _REINDEX + _CHECKS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local i = checks_hold(2)
if not i then return 0 end
if i <= #ARGV then
  redis.call('HSET', KEYS[1], unpack(ARGV, i, #ARGV))
  for j = i, #ARGV, 2 do
    if ARGV[j] == 'status' or ARGV[j] == 'lease_until' then reindex(ARGV[1]); break end
  end
end
return 1
"""

# The compare-and-set above, returning the whole job (HGETALL) so a transition is one round trip,
# and LPUSHing ARGV[2] onto KEYS[8] when it is not empty. ARGV = id, message, then as above.
_TRANSITION_SCRIPT = _REINDEX + _CHECKS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local i = checks_hold(3)
if not i then return false end
if i <= #ARGV then
  redis.call('HSET', KEYS[1], unpack(ARGV, i, #ARGV))
  reindex(ARGV[1])
end
if ARGV[2] ~= '' then redis.call('LPUSH', KEYS[8], ARGV[2]) end
return redis.call('HGETALL', KEYS[1])
"""

# ARGV = id, created_at, then field/value pairs; KEYS[8] is the tenant's job list.
_CREATE_SCRIPT = _REINDEX + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3, #ARGV))
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
reindex(ARGV[1])
return 1
"""

# A tenant's submission limits in Lua (see Quota), shared by the create-and-enqueue script and the
# API's check before a body is read (api/limits.py). quota(active set, this window's counter, the
# previous window's, cap (0: off), rate limit (0: off), weight of the previous window, counter ttl,
# count) returns code, active, previous, current: code 0 admitted (this window counted when
# ``count``; the rate is only checked then), -3 over the in-flight cap, -4 over the rate; active -1
# when the cap is off, previous and current 0 when the rate is off.
QUOTA_LUA = """
local function quota(active_key, now_key, previous_key, cap, limit, weight, ttl, count)
  local active, previous, current = -1, 0, 0
  if cap > 0 then
    active = redis.call('SCARD', active_key)
    if active >= cap then return -3, active, previous, current end
  end
  if limit > 0 then
    current = tonumber(redis.call('GET', now_key) or '0')
    previous = tonumber(redis.call('GET', previous_key) or '0')
    if count then
      if previous * weight + current > limit - 1 then return -4, active, previous, current end
      current = redis.call('INCR', now_key)
      redis.call('EXPIRE', now_key, ttl)
    end
  end
  return 0, active, previous, current
end
"""

# The create script, then LPUSH of the job's Celery message onto KEYS[9] and the job's place in
# the strict-priority render order (KEYS[2..4]: queued high, normal, low), in one round trip; first
# the tenant's submission limits (see Quota), checked and counted in the same atomic step.
# KEYS[10] is the tenant's active set, KEYS[11..12] this and the previous rate window's counters.
# ARGV = id, created_at, message, max in flight (0: off), rate limit (0: off), weight of the previous
# window, counter ttl, '1' to count this submission toward the rate ('0': counted already), and the
# field/value pairs as one JSON array of strings (one argument, not ~50: redis-py packs each argument
# in Python, ~1 µs apiece). Returns {position (-2: not queued), active, previous, current}, {-1} if the id
# is taken, {-3, active} over the in-flight cap, {-4, active, previous, current} over the rate:
# nothing is written in those three cases. A Lua script is not rolled back when a command fails,
# so what could fail (a wrong-type key) is checked before the first write: all or nothing.
_CREATE_AND_ENQUEUE_SCRIPT = _REINDEX + QUOTA_LUA + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1} end
local kind = redis.call('TYPE', KEYS[9])['ok']
if kind ~= 'list' and kind ~= 'none' then return redis.error_reply('WRONGTYPE the queue key is a ' .. kind) end
local cap = tonumber(ARGV[4])
local code, active, previous, current = quota(KEYS[10], KEYS[11], KEYS[12], cap, tonumber(ARGV[5]),
                                              tonumber(ARGV[6]), ARGV[7], ARGV[8] == '1')
if code == -3 then return {-3, active} end
if code == -4 then return {-4, active, previous, current} end
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[9])))
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
reindex(ARGV[1])
redis.call('LPUSH', KEYS[9], ARGV[3])
if cap > 0 then active = active + 1 end
local ahead = 0
for i = 2, 4 do
  local rank = redis.call('ZRANK', KEYS[i], ARGV[1])
  if rank then return {ahead + rank, active, previous, current} end
  ahead = ahead + redis.call('ZCARD', KEYS[i])
end
return {-2, active, previous, current}
"""

_INDEX_KEYS = (*keys.QUEUED_ALL, keys.RUNNING, keys.INFLIGHT, keys.DEADLINES)


@dataclasses.dataclass(frozen=True)
class Quota:
    """A tenant's submission limits, checked by :meth:`RedisJobStore.create_and_enqueue_within` in the
    same atomic step as the create (built by :mod:`api.limits`, which owns their meaning).

    Refused when the tenant's active set holds ``max_in_flight`` jobs or more (0: off), or, when
    ``count``, when ``previous × previous_weight + current > rate_limit - 1`` over the two counters
    ``rate_keys`` (this window's, the previous one's; ``rate_limit`` 0: off); an admitted
    submission with ``count`` increments this window's counter (TTL ``counter_ttl_s``).
    """

    max_in_flight: int = 0
    rate_limit: int = 0
    rate_keys: tuple[str, str] | None = None
    previous_weight: float = 0.0
    counter_ttl_s: int = 0
    count: bool = True


@dataclasses.dataclass(frozen=True)
class QuotaAnswer:
    """What :meth:`RedisJobStore.create_and_enqueue_within` did: ``refused`` is None (created, at
    ``position``), ``"in_flight"`` or ``"rate"`` (nothing written). ``active`` is the tenant's queued
    and running jobs (this one included when created; -1: not read, the cap is off); ``previous`` and
    ``current`` the rate counters (``current`` after counting this one; 0 when the rate is off)."""

    refused: str | None
    position: int | None = None
    active: int = -1
    previous: int = 0
    current: int = 0


_NO_QUOTA = Quota()


def _create_args(job: Job, queue: str, message: str, quota: Quota = _NO_QUOTA) -> tuple[list[str], list[str]]:
    """(KEYS, ARGV) of the create-and-enqueue script."""
    rate_keys = quota.rate_keys or (keys.job(job.id), keys.job(job.id))  # not read when the rate is off
    fields: list[str] = []
    for name, value in dump_fields(job).items():
        fields += [name, _encode(value)]
    args = [job.id, repr(job.created_at), message, str(quota.max_in_flight), str(quota.rate_limit),
            repr(quota.previous_weight), str(quota.counter_ttl_s), "1" if quota.count else "0", _encode(fields)]
    return [keys.job(job.id), *_INDEX_KEYS, keys.tenant_jobs(job.tenant), queue,
            keys.tenant_active(job.tenant), *rate_keys], args


def _quota_answer(answer: Any, job_id: str) -> QuotaAnswer:
    code = int(answer[0])
    if code == -1:
        raise KeyError(f"job {job_id} already exists")
    if code == -3:
        return QuotaAnswer("in_flight", active=int(answer[1]))
    numbers = [int(v) for v in answer[1:4]]
    if code == -4:
        return QuotaAnswer("rate", None, *numbers)
    return QuotaAnswer(None, code if code >= 0 else None, *numbers)


class RedisJobStore(JobStore):
    """Jobs as Redis hashes (one JSON-encoded field per attribute) with Lua compare-and-set.

    ``async_client`` (same server) serves :meth:`create_and_enqueue_async` on the event loop, with
    no thread hop; without it that method runs the blocking client in a thread. A
    ``redis.asyncio`` client belongs to the event loop it first ran on: give each loop its own store.
    Give that client no ``socket_timeout`` (redis-py then wraps every send in ``asyncio.wait_for``,
    a new task per command): each call here is bounded by ``async_timeout_s`` instead, and raises
    ``TimeoutError`` (an ``OSError``) past it.
    """

    def __init__(self, client: redis.Redis, async_client: aioredis.Redis | None = None,
                 async_timeout_s: float = 10.0) -> None:
        self._async_timeout_s = async_timeout_s
        self.redis = client
        self._cas = client.register_script(_CAS_SCRIPT)
        self._transition = client.register_script(_TRANSITION_SCRIPT)
        self._create = client.register_script(_CREATE_SCRIPT)
        self._create_and_enqueue = client.register_script(_CREATE_AND_ENQUEUE_SCRIPT)
        self._create_and_enqueue_on_loop = (async_client.register_script(_CREATE_AND_ENQUEUE_SCRIPT)
                                            if async_client is not None else None)

    def create(self, job: Job) -> None:
        flat: list[str] = []
        for name, value in dump_fields(job).items():
            flat += [name, _encode(value)]
        created = self._create(
            keys=[keys.job(job.id), *_INDEX_KEYS, keys.tenant_jobs(job.tenant)],
            args=[job.id, repr(job.created_at), *flat],
        )
        if not created:
            raise KeyError(f"job {job.id} already exists")

    def create_and_enqueue(self, job: Job, queue: str, message: str) -> int | None:
        return self.create_and_enqueue_within(job, queue, message, _NO_QUOTA).position

    async def create_and_enqueue_async(self, job: Job, queue: str, message: str) -> int | None:
        return (await self.create_and_enqueue_within_async(job, queue, message, _NO_QUOTA)).position

    def create_and_enqueue_within(self, job: Job, queue: str, message: str, quota: Quota) -> QuotaAnswer:
        """:meth:`create_and_enqueue` if the tenant's ``quota`` admits it, checked (and counted) in the
        same script: refused, nothing is written. Raises ``KeyError`` if the id is taken."""
        script_keys, args = _create_args(job, queue, message, quota)
        return _quota_answer(self._create_and_enqueue(keys=script_keys, args=args), job.id)

    async def create_and_enqueue_within_async(self, job: Job, queue: str, message: str,
                                              quota: Quota) -> QuotaAnswer:
        """:meth:`create_and_enqueue_within` on the event loop (in a thread without ``async_client``)."""
        if self._create_and_enqueue_on_loop is None:
            return await asyncio.to_thread(self.create_and_enqueue_within, job, queue, message, quota)
        script_keys, args = _create_args(job, queue, message, quota)
        script = self._create_and_enqueue_on_loop
        async with asyncio.timeout(self._async_timeout_s):
            try:
                # EVALSHA itself: AsyncScript.__call__ adds an isinstance check against a typing
                # Protocol subclass (its Pipeline) and two more wrappers per call
                answer = await script.registered_client.execute_command(
                    "EVALSHA", script.sha, len(script_keys), *script_keys, *args)
            except redis.exceptions.NoScriptError:  # a restarted or flushed server: load it again
                answer = await script(keys=script_keys, args=args)
        return _quota_answer(answer, job.id)

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return _decode_job(raw) if raw else None

    def compare_and_set(self, job_id: str, expect: Expect, fields: Mapping[str, Any]) -> bool:
        return bool(self._cas(keys=[keys.job(job_id), *_INDEX_KEYS], args=[job_id, *_cas_args(expect, fields)]))

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        fields: Mapping[str, Any] | None = None,
        *,
        from_: Iterable[JobStatus] | None = None,
        expect: Expect | None = None,
        push: tuple[str, str] | None = None,
    ) -> Job | None:
        checks, changes = _transition_checks(to, fields, from_, expect)
        args = [job_id, push[1] if push else "", *_cas_args(checks, changes)]
        script_keys = [keys.job(job_id), *_INDEX_KEYS, push[0] if push else keys.job(job_id)]
        raw = self._transition(keys=script_keys, args=args)
        if not raw:
            return None
        return _decode_job(dict(zip(raw[0::2], raw[1::2], strict=True)))

    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        ids: list[Any] = list(self.redis.zrevrange(keys.tenant_jobs(tenant), offset, offset + limit - 1))
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def tenant_job_ids_before(
        self, tenant: str, before: tuple[float, str] | None, limit: int = 50,
    ) -> list[tuple[str, float]]:
        key = keys.tenant_jobs(tenant)
        if before is None:
            top: list[Any] = list(self.redis.zrevrange(key, 0, limit - 1, withscores=True))
            return [(i.decode() if isinstance(i, bytes) else str(i), float(sc)) for i, sc in top]
        score, last_id = before
        rows: list[tuple[str, float]] = []
        start = 0
        while len(rows) < limit:
            # same-score members come in reverse lexicographic order: skip those at or above the cursor
            batch: list[Any] = list(self.redis.zrevrangebyscore(key, repr(score), "-inf", start=start,
                                                                num=limit + 1, withscores=True))
            if not batch:
                break
            start += len(batch)
            for member, member_score in batch:
                job_id = member.decode() if isinstance(member, bytes) else str(member)
                if float(member_score) < score or job_id < last_id:
                    rows.append((job_id, float(member_score)))
        return rows[:limit]


    def queue_position(self, job_id: str) -> int | None:
        pipe = self.redis.pipeline(transaction=False)
        for priority in PRIORITY_ORDER:
            pipe.zrank(keys.queued(priority.value), job_id)
            pipe.zcard(keys.queued(priority.value))
        answers = pipe.execute()
        ahead = 0
        for rank, size in zip(answers[0::2], answers[1::2]):
            if rank is not None:
                return ahead + int(rank)
            ahead += int(size)
        return None

    def queued_count(self, priority: Priority) -> int:
        return int(self.redis.zcard(keys.queued(priority.value)))

    def running_count(self) -> int:
        return int(self.redis.llen(keys.INFLIGHT))

    def tenant_active_count(self, tenant: str) -> int:
        return int(self.redis.scard(keys.tenant_active(tenant)))

    def lapsed_leases(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        rows: list[Any] = list(self.redis.zrangebyscore(keys.RUNNING, "-inf", f"({now!r}", start=0, num=limit,
                                                         withscores=True))
        return [(i.decode() if isinstance(i, bytes) else str(i), float(score)) for i, score in rows]

    def overdue_queued(self, now: float, limit: int = 100) -> list[str]:
        rows: list[Any] = list(self.redis.zrangebyscore(keys.DEADLINES, "-inf", f"({now!r}", start=0, num=limit))
        return [i.decode() if isinstance(i, bytes) else str(i) for i in rows]


class InMemoryJobStore(JobStore):
    """A thread-safe dict-backed store with the same semantics, for unit tests.

    ``pushed`` holds the ``(queue, message)`` pairs of :meth:`create_and_enqueue` and of
    transitions with ``push``, oldest first:
    the broker lists of this stand-in.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, str]] = {}
        # reentrant: create_and_enqueue holds it around create (which subclasses may override)
        self._lock = threading.RLock()
        self.pushed: list[tuple[str, str]] = []

    def create(self, job: Job) -> None:
        with self._lock:
            if job.id in self._jobs:
                raise KeyError(f"job {job.id} already exists")
            self._jobs[job.id] = {k: _encode(v) for k, v in dump_fields(job).items()}

    def create_and_enqueue(self, job: Job, queue: str, message: str) -> int | None:
        with self._lock:
            self.create(job)
            self.pushed.append((queue, message))
            return self.queue_position(job.id)

    async def create_and_enqueue_async(self, job: Job, queue: str, message: str) -> int | None:
        return self.create_and_enqueue(job, queue, message)  # no I/O: no thread needed

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

    def _push_lock(self) -> contextlib.AbstractContextManager[Any]:
        return self._lock

    def _push(self, queue: str, message: str) -> None:
        self.pushed.append((queue, message))

    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        with self._lock:
            jobs = [(json.loads(r["created_at"]), i) for i, r in self._jobs.items()
                    if json.loads(r["tenant"]) == tenant]
        jobs.sort(reverse=True)
        return [i for _, i in jobs[offset:offset + limit]]

    def _all(self) -> list[Job]:
        with self._lock:
            raws = [dict(r) for r in self._jobs.values()]
        return [_decode_job(r) for r in raws]

    def _queue(self) -> list[Job]:
        rank = {p: i for i, p in enumerate(PRIORITY_ORDER)}
        queued = [j for j in self._all() if j.status is JobStatus.QUEUED]
        return sorted(queued, key=lambda j: (rank[j.params.priority], j.created_at))

    def queue_position(self, job_id: str) -> int | None:
        ids = [j.id for j in self._queue()]
        return ids.index(job_id) if job_id in ids else None

    def queued_count(self, priority: Priority) -> int:
        return sum(1 for j in self._queue() if j.params.priority is priority)

    def running_count(self) -> int:
        return sum(1 for j in self._all() if j.status is JobStatus.RUNNING)

    def tenant_active_count(self, tenant: str) -> int:
        return sum(1 for j in self._all() if j.tenant == tenant and not j.status.is_terminal)

    def lapsed_leases(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        rows = [(j.id, j.lease_until or 0.0) for j in self._all() if j.status is JobStatus.RUNNING]
        return sorted((r for r in rows if r[1] < now), key=lambda r: r[1])[:limit]

    def overdue_queued(self, now: float, limit: int = 100) -> list[str]:
        rows = [(queue_deadline_at(j), j.id) for j in self._queue()]
        return [i for d, i in sorted((d, i) for d, i in rows if d is not None and d < now)][:limit]
