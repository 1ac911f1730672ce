"""Every Redis key and object-store key layout, in one place.

All Redis keys share the ``editfarm:`` prefix so an operator can find (and a
test can clean) everything we write.
"""

PREFIX = "editfarm:"


def job(job_id: str) -> str:
    """Hash: one field per top-level Job attribute, each JSON-encoded."""
    return f"{PREFIX}job:{job_id}"


def tenant_jobs(tenant: str) -> str:
    """Sorted set of a tenant's job ids, scored by created_at (epoch s)."""
    return f"{PREFIX}tenant:{tenant}:jobs"


LEGACY_MODEL = "default"
"""The model of a one-model cluster (``EDITFARM_MODEL`` alone, and job records from before the fleet):
its keys keep the names they had before models existed, so an upgrade strands no queued message.
lua/reindex.lua repeats this rule for the keys it derives from a job's model."""


def _scoped(model: str | None) -> str:
    return "" if model is None or model == LEGACY_MODEL else f"{model}:"


def queued(priority: str, model: str | None = None) -> str:
    """Sorted set of one model's queued job ids of one priority, scored by created_at (queue position):
    ``queued:<model>:<priority>`` (the legacy model: ``queued:<priority>``)."""
    return f"{PREFIX}queued:{_scoped(model)}{priority}"


RENDER_PRIORITIES = ("high", "normal", "low")
"""Priorities in the strict order render queues are consumed (broker.schema.PRIORITY_ORDER's values)."""

QUEUED_ALL = tuple(queued(p) for p in RENDER_PRIORITIES)
"""The legacy model's queued sets: every job script gets them as KEYS[2..4] (lua/reindex.lua)."""

RUNNING = f"{PREFIX}running"
"""Sorted set of running job ids (every model) scored by lease_until (epoch s): the reaper finds lapsed
leases here."""


def inflight(model: str | None = None) -> str:
    """List of one model's running job ids; its LLEN is what that model's KEDA scaler reads so running pods
    are not scaled away: ``inflight:<model>`` (the legacy model: ``inflight``)."""
    scope = _scoped(model)
    return f"{PREFIX}inflight:{scope[:-1]}" if scope else f"{PREFIX}inflight"


INFLIGHT = inflight()
"""The legacy model's in-flight list (KEYS[6] of every job script)."""


def render_seconds(model: str) -> str:
    """List of a model's last render durations in seconds (newest first, capped): ``GET /v1/models``'s
    median."""
    return f"{PREFIX}model:{model}:render_s"


def model_workers(model: str) -> str:
    """Sorted set of the render workers serving ``model``, scored by their last heartbeat (epoch s)."""
    return f"{PREFIX}model:{model}:workers"

DEADLINES = f"{PREFIX}deadlines"
"""Sorted set of queued job ids scored by their queue deadline (epoch s)."""

REPLICA_PROBE = f"{PREFIX}replica-probe"
"""String written (with a 60 s TTL) just before a ``WAIT`` that must cover what is already on the
primary: ``WAIT`` counts from the connection's own last write (broker/jobstore/redis.py)."""

EXPIRY = f"{PREFIX}expiry"
"""Sorted set of terminal job ids scored by when their retention ends (epoch s): the retention
sweeper (workers/sweeper.py) reads the due ones. Written by lua/reindex.lua."""


# -- Celery's queues: kombu keeps each queue as a Redis list named after it (no prefix: the names are
# what operators pass to workers with -Q and what KEDA and dashboards read)


def render_queue(priority: str, model: str | None = None) -> str:
    """List of one model's render messages of one priority: ``render.<model>.<priority>`` (a fleet: one
    queue set per model); the legacy model (or None) keeps ``render.<priority>``."""
    scope = _scoped(model)
    return f"render.{scope[:-1]}.{priority}" if scope else f"render.{priority}"


KOMBU_UNACKED = "unacked"
"""kombu's hash of the messages workers hold unacknowledged (prefetched, running, or waiting for their
countdown), by delivery tag: ``[message, exchange, routing key]`` as JSON (kombu's default name)."""

WEBHOOK_QUEUE = "webhooks"
"""List of the CPU workers' messages: notify (a job's webhook to build) and webhook deliveries."""


def reaped(job_id: str, lease_until: float) -> str:
    """Marker that the reaper already re-queued this job for this lapsed lease."""
    return f"{PREFIX}reaped:{job_id}:{lease_until!r}"


def resent(job_id: str) -> str:
    """Marker (with a TTL) that a reaper already re-sent this queued job's lost render message."""
    return f"{PREFIX}resent:{job_id}"


def worker_drain(worker_name: str) -> str:
    """Epoch seconds by which a draining worker must hand back its running job."""
    return f"{PREFIX}worker:{worker_name}:drain_by"


def job_events(job_id: str) -> str:
    """Pub/sub channel of a job's status and progress events."""
    return f"{PREFIX}events:{job_id}"


def webhook_message(message_id: str) -> str:
    """Hash: url, body, tenant, state, attempts of one webhook message."""
    return f"{PREFIX}webhook:{message_id}"


WEBHOOK_PENDING = f"{PREFIX}webhook:pending"
"""Sorted set of webhook message ids that may still need a delivery, scored by when to look at each again
(epoch s): written when a message is stored or redelivered, read by the relay (workers/relay.py), which
re-queues a pending message nobody is delivering and drops the ended ones."""


def webhook_attempts(message_id: str) -> str:
    """List of JSON delivery attempts of one webhook message."""
    return f"{PREFIX}webhook:{message_id}:attempts"


def webhook_lock(message_id: str) -> str:
    """String lock held while one delivery attempt of a message is in flight."""
    return f"{PREFIX}webhook:{message_id}:lock"


def api_key(digest: str) -> str:
    """String (JSON ApiKeyInfo) of an API key, by the SHA-256 hex of the key."""
    return f"{PREFIX}apikey:{digest}"


API_KEY_IDS = f"{PREFIX}apikeys"
"""Hash key_id → digest, to list and revoke keys by id."""


def tenant_webhook_secrets(tenant: str) -> str:
    """String (JSON list) of a tenant's webhook signing secrets, newest first."""
    return f"{PREFIX}tenant:{tenant}:webhook_secrets"


def rate_window(tenant: str, window: int) -> str:
    """Counter of a tenant's submissions in one fixed rate-limit window."""
    return f"{PREFIX}tenant:{tenant}:rate:{window}"


def tenant_active(tenant: str) -> str:
    """Set of a tenant's queued and running job ids (the in-flight cap)."""
    return f"{PREFIX}tenant:{tenant}:active"


def job_webhooks(job_id: str) -> str:
    """Set of the webhook message ids a job produced (its delivery log)."""
    return f"{PREFIX}job:{job_id}:webhooks"


def idempotency(tenant: str, key: str) -> str:
    """String "<body sha256> <job id>" remembered for 24 h per tenant and Idempotency-Key."""
    return f"{PREFIX}tenant:{tenant}:idem:{key}"


def tenant_retention(tenant: str) -> str:
    """String: the tenant's job retention in seconds, overriding EDITFARM_JOB_RETENTION_S."""
    return f"{PREFIX}tenant:{tenant}:retention_s"


def worker_heartbeat(worker_name: str) -> str:
    """String with the last heartbeat (epoch s) of a worker process."""
    return f"{PREFIX}worker:{worker_name}:heartbeat"


def gave_way(job_id: str) -> str:
    """Counter (with a TTL) of the times a job gave way to a higher one whose message a worker held."""
    return f"{PREFIX}gave_way:{job_id}"


# -- object-store keys: per tenant and job, so a bucket policy or lifecycle rule can scope them --


def input_object(tenant: str, job_id: str, index: int, ext: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/inputs/{index}.{ext}"


def preview_object(tenant: str, job_id: str, step: int) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/previews/{step}.jpeg"


def output_object(tenant: str, job_id: str, index: int, ext: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/outputs/{index}.{ext}"


def job_archive_object(tenant: str, job_id: str) -> str:
    """The job record archived before the retention sweeper deleted it from Redis."""
    return f"tenants/{tenant}/jobs/{job_id}/job.json"


def mask_object(tenant: str, job_id: str, ext: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/inputs/mask.{ext}"


JOB_OBJECTS_PREFIX = "tenants/"
"""Every job's objects (and archived record) are under it."""


def job_of_object(key: str) -> str | None:
    """The job id of a job's object key (any of the above), None for another key."""
    parts = key.split("/", 4)
    if len(parts) < 5 or parts[0] != "tenants" or parts[2] != "jobs" or not parts[3]:
        return None
    return parts[3]
