"""An ``Idempotency-Key`` pointed at its job by the create itself.

A submission with a key holds it (``held``: ``"<sha256> pending:<token>"``) while it works; the job
store's create then sets it to ``done`` (``"<sha256> <job id>"``) in the same atomic step that records
and queues the job, so the key and the job exist together or not at all: one ``WAIT`` confirms both
on the replicas (``EDITFARM_REDIS_MIN_REPLICAS``), a failover keeps both or neither, and a create
whose reply was lost leaves the key pointing at the job it made (a retry replays it, never makes a
second). A withdrawn create (too few replicas) frees the key with it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyClaim:
    """``key`` (the store's key, ``broker.keys.idempotency``) becomes ``done`` for ``ttl_s`` seconds if it
    still holds ``held`` (a marker that expired or was taken over is left alone)."""

    key: str
    held: str
    done: str
    ttl_s: int
