"""Jobs on Redis: one hash per job (one JSON-encoded field per attribute), index sets kept in step by
the same Lua scripts (``broker/lua/``) that change the hash, so every change is one atomic step."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from broker import keys, scripts
from broker.jobstore.base import Expect, JobStore, transition_checks
from broker.jobstore.claim import KeyClaim
from broker.jobstore.codec import decode_job, encode
from broker.jobstore.quota import NO_QUOTA, Quota, QuotaAnswer
from broker.replication import NO_WAIT, ReplicaPolicy, ReplicaShortfall
from broker.schema import PRIORITY_ORDER, TERMINAL_STATUSES, Job, JobStatus, Priority, dump_fields

logger = logging.getLogger("editfarm.store")

# the index sets every job script receives as KEYS[2..7] (see lua/reindex.lua)
INDEX_KEYS = (*keys.QUEUED_ALL, keys.RUNNING, keys.INFLIGHT, keys.DEADLINES)

CAS_SCRIPT = scripts.source("reindex", "checks", "cas")
TRANSITION_SCRIPT = scripts.source("reindex", "checks", "transition")
CREATE_SCRIPT = scripts.source("reindex", "create")
CREATE_AND_ENQUEUE_SCRIPT = scripts.source("reindex", "quota", "create_and_enqueue")
QUOTA_CHECK_SCRIPT = scripts.source("quota", "quota_check")
WITHDRAW_SCRIPT = scripts.source("reindex", "withdraw")


def _cas_args(expect: Expect, fields: Mapping[str, Any]) -> list[Any]:
    """The compare-and-set part of a script's ARGV (lua/checks.lua): the checks, then field/value pairs."""
    args: list[Any] = [len(expect)]
    for name, values in expect.items():
        encoded = [encode(v) for v in values]
        args += [name, len(encoded), *encoded]
    for name, value in fields.items():
        args += [name, encode(value)]
    return args


def _rate_keys(tenant: str, quota: Quota) -> tuple[str, str]:
    # not read when the rate is off, but a script needs a key in each KEYS slot
    return quota.rate_keys or (keys.tenant_active(tenant), keys.tenant_active(tenant))


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _create_args(job: Job, queue: str, message: str, quota: Quota,
                 claim: KeyClaim | None) -> tuple[list[str], list[str]]:
    """(KEYS, ARGV) of lua/create_and_enqueue.lua."""
    fields: list[str] = []
    for name, value in dump_fields(job).items():
        fields += [name, encode(value)]
    args = [job.id, repr(job.created_at), message, str(quota.max_in_flight), str(quota.rate_limit),
            repr(quota.previous_weight), str(quota.counter_ttl_s), _flag(quota.check_rate), _flag(quota.count),
            encode(fields), *_claim_args(claim)]
    # a script needs a key in each KEYS slot: the job's own when there is no Idempotency-Key
    return [keys.job(job.id), *INDEX_KEYS, keys.tenant_jobs(job.tenant), queue,
            keys.tenant_active(job.tenant), *_rate_keys(job.tenant, quota),
            claim.key if claim else keys.job(job.id)], args


def _claim_args(claim: KeyClaim | None) -> list[str]:
    return [claim.held, claim.done, str(claim.ttl_s)] if claim else ["", "", "0"]


def _check_args(tenant: str, quota: Quota) -> tuple[list[str], list[str]]:
    """(KEYS, ARGV) of lua/quota_check.lua."""
    args = [str(quota.max_in_flight), str(quota.rate_limit), repr(quota.previous_weight),
            str(quota.counter_ttl_s), _flag(quota.check_rate), _flag(quota.count)]
    return [keys.tenant_active(tenant), *_rate_keys(tenant, quota)], args


def _answer(reply: Any, job_id: str | None = None) -> QuotaAnswer:
    """A quota script's reply (lua/quota.lua's codes) as a QuotaAnswer."""
    code = int(reply[0])
    if code == -1:
        raise KeyError(f"job {job_id} already exists")
    if code == -3:
        return QuotaAnswer("in_flight", active=int(reply[1]))
    numbers = [int(v) for v in reply[1:4]]
    if code == -4:
        return QuotaAnswer("rate", None, *numbers)
    return QuotaAnswer(None, code if code >= 0 and job_id is not None else None, *numbers)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _evalsha(script: Any, script_keys: list[str], args: list[Any]) -> tuple[Any, ...]:
    return ("EVALSHA", script.sha, len(script_keys), *script_keys, *args)


def _script_reply(replies: list[Any]) -> tuple[Any, int] | None:
    """(script reply, replicas acknowledged) of a script + WAIT pipeline run with
    ``raise_on_error=False``; None if the server did not know the script (load it, run again).

    Raises:
        redis.exceptions.RedisError: the script or the WAIT failed.
    """
    reply, acked = replies
    if isinstance(reply, redis.exceptions.NoScriptError):
        return None
    for answer in (reply, acked):
        if isinstance(answer, Exception):
            raise answer
    return reply, int(acked)


class RedisJobStore(JobStore):
    """Jobs as Redis hashes with Lua compare-and-set.

    ``async_client`` (same server) serves the ``*_async`` quota and create methods on the event loop,
    with no thread hop; without it those run the blocking client in a thread. A ``redis.asyncio``
    client belongs to the event loop it first ran on: give each loop its own store. Give that client
    no ``socket_timeout`` (redis-py then wraps every send in ``asyncio.wait_for``, a new task per
    command): each call here is bounded by ``async_timeout_s`` instead, and raises ``TimeoutError``
    (an ``OSError``) past it.
    """

    def __init__(self, client: redis.Redis, async_client: aioredis.Redis | None = None,
                 async_timeout_s: float = 10.0, *, replicas: ReplicaPolicy = NO_WAIT) -> None:
        self._async_timeout_s = async_timeout_s
        self.redis = client
        # creates and terminal transitions wait for this many replicas (broker/replication.py);
        # the WAIT timeout must stay below the clients' socket timeouts
        self.replicas = replicas
        self._withdraw = client.register_script(WITHDRAW_SCRIPT)
        self._cas = client.register_script(CAS_SCRIPT)
        self._transition = client.register_script(TRANSITION_SCRIPT)
        self._create = client.register_script(CREATE_SCRIPT)
        self._create_and_enqueue = client.register_script(CREATE_AND_ENQUEUE_SCRIPT)
        self._quota_check = client.register_script(QUOTA_CHECK_SCRIPT)
        self._on_loop = None if async_client is None else {
            "create": async_client.register_script(CREATE_AND_ENQUEUE_SCRIPT),
            "check": async_client.register_script(QUOTA_CHECK_SCRIPT),
        }

    async def _run_on_loop(self, name: str, script_keys: list[str], args: list[str]) -> Any:
        assert self._on_loop is not None
        script = self._on_loop[name]
        async with asyncio.timeout(self._async_timeout_s):
            try:
                # EVALSHA itself: AsyncScript.__call__ adds an isinstance check against a typing
                # Protocol subclass (its Pipeline) and two more wrappers per call
                return await script.registered_client.execute_command(
                    "EVALSHA", script.sha, len(script_keys), *script_keys, *args)
            except redis.exceptions.NoScriptError:  # a restarted or flushed server: load it again
                return await script(keys=script_keys, args=args)

    def create(self, job: Job) -> None:
        flat: list[str] = []
        for name, value in dump_fields(job).items():
            flat += [name, encode(value)]
        created = self._create(
            keys=[keys.job(job.id), *INDEX_KEYS, keys.tenant_jobs(job.tenant)],
            args=[job.id, repr(job.created_at), *flat],
        )
        if not created:
            raise KeyError(f"job {job.id} already exists")

    def create_and_enqueue(self, job: Job, queue: str, message: str) -> int | None:
        return self.create_and_enqueue_within(job, queue, message, NO_QUOTA).position

    async def create_and_enqueue_async(self, job: Job, queue: str, message: str) -> int | None:
        return (await self.create_and_enqueue_within_async(job, queue, message, NO_QUOTA)).position

    def create_and_enqueue_within(self, job: Job, queue: str, message: str, quota: Quota, *,
                                  claim: KeyClaim | None = None) -> QuotaAnswer:
        """As the base's; ``claim``'s key is pointed at the job in the same script. With a
        :class:`~broker.replication.ReplicaPolicy` that waits, the job (and its key) counts as created
        only once enough replicas hold it.

        Raises:
            KeyError: the id is taken.
            ReplicaShortfall: too few replicas acknowledged the create in time (see :meth:`_fall_short`).
        """
        script_keys, args = _create_args(job, queue, message, quota, claim)
        if not self.replicas.waits:
            return self._created(self._create_and_enqueue(keys=script_keys, args=args), job, claim)
        reply, acked = self._script_and_wait(self._create_and_enqueue, script_keys, args)
        answer = self._created(reply, job, claim)
        if answer.refused is None and acked < self.replicas.min_replicas:
            self._fall_short(job, queue, message, acked, claim)
        return answer

    async def create_and_enqueue_within_async(self, job: Job, queue: str, message: str, quota: Quota, *,
                                              claim: KeyClaim | None = None) -> QuotaAnswer:
        """:meth:`create_and_enqueue_within` on the event loop (its script and ``WAIT`` in one
        pipeline, so on one connection).

        Raises:
            KeyError: the id is taken.
            ReplicaShortfall: as :meth:`create_and_enqueue_within`.
        """
        if self._on_loop is None:
            return await asyncio.to_thread(self.create_and_enqueue_within, job, queue, message, quota, claim=claim)
        script_keys, args = _create_args(job, queue, message, quota, claim)
        if not self.replicas.waits:
            return self._created(await self._run_on_loop("create", script_keys, args), job, claim)
        reply, acked = await self._script_and_wait_on_loop("create", script_keys, args)
        answer = self._created(reply, job, claim)
        if answer.refused is None and acked < self.replicas.min_replicas:
            await asyncio.to_thread(self._fall_short, job, queue, message, acked, claim)
        return answer

    @staticmethod
    def _created(reply: Any, job: Job, claim: KeyClaim | None) -> QuotaAnswer:
        answer = _answer(reply, job.id)
        if claim is not None and answer.refused is None and not int(reply[4]):
            logger.warning("the Idempotency-Key of %s was no longer held (the request outlived its marker)",
                           job.id)
        return answer

    def _script_and_wait(self, script: Any, script_keys: list[str], args: list[Any]) -> tuple[Any, int]:
        """``script`` then ``WAIT`` on one connection, one round trip: (script reply, replicas acked)."""
        for _ in range(2):
            pipe: Any = self.redis.pipeline(transaction=False)  # Any: execute_command is untyped
            pipe.execute_command(*_evalsha(script, script_keys, args))
            pipe.execute_command(*self.replicas.wait_args())
            done = _script_reply(pipe.execute(raise_on_error=False))
            if done is not None:
                return done
            script.registered_client.script_load(script.script)  # a restarted or flushed server
        raise redis.exceptions.NoScriptError("the script could not be loaded")

    async def _script_and_wait_on_loop(self, name: str, script_keys: list[str], args: list[Any]) -> tuple[Any, int]:
        """:meth:`_script_and_wait` with the event loop's client, bounded by ``async_timeout_s``."""
        assert self._on_loop is not None
        script = self._on_loop[name]
        client = script.registered_client
        async with asyncio.timeout(self._async_timeout_s):
            for _ in range(2):
                pipe = client.pipeline(transaction=False)
                pipe.execute_command(*_evalsha(script, script_keys, args))
                pipe.execute_command(*self.replicas.wait_args())
                done = _script_reply(await pipe.execute(raise_on_error=False))
                if done is not None:
                    return done
                await client.script_load(script.script)
        raise redis.exceptions.NoScriptError("the script could not be loaded")

    def _fall_short(self, job: Job, queue: str, message: str, acked: int, claim: KeyClaim | None) -> None:
        """A create that too few replicas acknowledged: withdraw it if no worker has taken it yet (a
        failover could drop it after the client was told "accepted"), with the Idempotency-Key the
        create pointed at it; else keep both (it runs already; a retry with the key gets it).

        Raises:
            ReplicaShortfall: always; ``kept`` says which.
        """
        self.replicas.on_shortfall("create", acked)
        withdrawn = self._withdraw(keys=[keys.job(job.id), *INDEX_KEYS, keys.tenant_jobs(job.tenant), queue,
                                         claim.key if claim else keys.job(job.id)],
                                   args=[job.id, message, claim.done if claim else ""])
        kept = not withdrawn
        logger.warning("create of %s: %d of %d replica(s) acknowledged within %d ms; %s", job.id, acked,
                       self.replicas.min_replicas, self.replicas.wait_timeout_ms,
                       "kept (a worker had taken it)" if kept else "withdrawn")
        raise ReplicaShortfall("create", acked=acked, wanted=self.replicas.min_replicas, job_id=job.id, kept=kept)

    def confirm_replicated(self, job_id: str) -> None:
        """Wait until enough replicas hold what is on the primary now (a replayed job, for one).

        ``WAIT`` counts replicas that acknowledged this connection's last write, so a write that
        replicates (the probe key, with a TTL) goes first, on the same connection.

        Raises:
            ReplicaShortfall: too few replicas acknowledged in time (``kept``: the job stays).
        """
        if not self.replicas.waits:
            return
        pipe: Any = self.redis.pipeline(transaction=False)  # Any: execute_command is untyped
        pipe.execute_command("SET", keys.REPLICA_PROBE, job_id, "PX", 60_000)
        pipe.execute_command(*self.replicas.wait_args())
        acked = int(pipe.execute()[1])
        if acked < self.replicas.min_replicas:
            self.replicas.on_shortfall("confirm", acked)
            raise ReplicaShortfall("confirm", acked=acked, wanted=self.replicas.min_replicas, job_id=job_id,
                                   kept=True)

    def check_quota(self, tenant: str, quota: Quota) -> QuotaAnswer:
        script_keys, args = _check_args(tenant, quota)
        return _answer(self._quota_check(keys=script_keys, args=args))

    async def check_quota_async(self, tenant: str, quota: Quota) -> QuotaAnswer:
        if self._on_loop is None:
            return await asyncio.to_thread(self.check_quota, tenant, quota)
        script_keys, args = _check_args(tenant, quota)
        return _answer(await self._run_on_loop("check", script_keys, args))

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return decode_job(raw) if raw else None

    def compare_and_set(self, job_id: str, expect: Expect, fields: Mapping[str, Any]) -> bool:
        return bool(self._cas(keys=[keys.job(job_id), *INDEX_KEYS], args=[job_id, *_cas_args(expect, fields)]))

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
        checks, changes = transition_checks(to, fields, from_, expect)
        args = [job_id, push[1] if push else "", *_cas_args(checks, changes)]
        script_keys = [keys.job(job_id), *INDEX_KEYS, push[0] if push else keys.job(job_id)]
        if self.replicas.waits and to in TERMINAL_STATUSES:
            raw, acked = self._script_and_wait(self._transition, script_keys, args)
            if raw and acked < self.replicas.min_replicas:
                # the job did end, on the primary: report it ended (see docs/reliability.md)
                self.replicas.on_shortfall("transition", acked)
                logger.warning("%s of %s: %d of %d replica(s) acknowledged within %d ms", to.value, job_id,
                               acked, self.replicas.min_replicas, self.replicas.wait_timeout_ms)
        else:
            raw = self._transition(keys=script_keys, args=args)
        if not raw:
            return None
        return decode_job(dict(zip(raw[0::2], raw[1::2], strict=True)))

    def tenant_job_ids(self, tenant: str, offset: int = 0, limit: int = 50) -> list[str]:
        ids: list[Any] = list(self.redis.zrevrange(keys.tenant_jobs(tenant), offset, offset + limit - 1))
        return [_text(i) for i in ids]

    def tenant_job_ids_before(
        self, tenant: str, before: tuple[float, str] | None, limit: int = 50,
    ) -> list[tuple[str, float]]:
        key = keys.tenant_jobs(tenant)
        if before is None:
            top: list[Any] = list(self.redis.zrevrange(key, 0, limit - 1, withscores=True))
            return [(_text(i), float(sc)) for i, sc in top]
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
                job_id = _text(member)
                if float(member_score) < score or job_id < last_id:
                    rows.append((job_id, float(member_score)))
        return rows[:limit]

    def queue_position(self, job_id: str, model: str | None = None) -> int | None:
        pipe = self.redis.pipeline(transaction=False)
        for priority in PRIORITY_ORDER:
            pipe.zrank(keys.queued(priority.value, model), job_id)
            pipe.zcard(keys.queued(priority.value, model))
        answers = pipe.execute()
        ahead = 0
        for rank, size in zip(answers[0::2], answers[1::2], strict=True):
            if rank is not None:
                return ahead + int(rank)
            ahead += int(size)
        return None

    def queued_count(self, priority: Priority, model: str | None = None) -> int:
        return int(self.redis.zcard(keys.queued(priority.value, model)))

    def running_count(self, model: str | None = None) -> int:
        return int(self.redis.llen(keys.inflight(model)))

    def tenant_active_count(self, tenant: str) -> int:
        return int(self.redis.scard(keys.tenant_active(tenant)))

    def lapsed_leases(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        rows: list[Any] = list(self.redis.zrangebyscore(keys.RUNNING, "-inf", f"({now!r}", start=0, num=limit,
                                                         withscores=True))
        return [(_text(i), float(score)) for i, score in rows]

    def overdue_queued(self, now: float, limit: int = 100) -> list[str]:
        rows: list[Any] = list(self.redis.zrangebyscore(keys.DEADLINES, "-inf", f"({now!r}", start=0, num=limit))
        return [_text(i) for i in rows]
