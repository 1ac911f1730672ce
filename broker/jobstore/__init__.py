"""The job store: the interface (:mod:`.base`), its Redis backend (:mod:`.redis`, Lua scripts in
``broker/lua/``) and its in-memory stand-in (:mod:`.memory`), and the submission quota they check
with a create (:mod:`.quota`), and the Idempotency-Key a create points at its job (:mod:`.claim`)."""

from broker.jobstore.base import Expect, JobStore
from broker.jobstore.claim import KeyClaim
from broker.jobstore.codec import decode_job, encode
from broker.jobstore.memory import InMemoryJobStore
from broker.jobstore.quota import NO_QUOTA, Quota, QuotaAnswer, over_rate
from broker.jobstore.redis import RedisJobStore

__all__ = ["NO_QUOTA", "Expect", "InMemoryJobStore", "JobStore", "KeyClaim", "Quota", "QuotaAnswer", "RedisJobStore",
           "decode_job", "encode", "over_rate"]
