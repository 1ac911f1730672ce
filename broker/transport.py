"""kombu's Redis and Sentinel transports with one fix: a Celery worker survives losing its broker
connection while it holds an unacknowledged message (a Redis restart, a Sentinel failover).

On a lost connection Celery first detaches the kombu ``Connection`` from its transport
(``transport.client = None``) and then closes the channel, whose close gives back the messages it
holds unacknowledged (``task_acks_late``: a task in progress). That needs a new connection pool,
built from ``transport.client`` — by then None — so kombu raises ``AttributeError`` (kombu issues
#582, #970), which Celery does not treat as a connection error: the worker exits ("Unrecoverable
error") instead of reconnecting. Seen in tests/test_faults_failover.py (the webhook worker, holding
a webhook task, died at a failover). These transports keep their kombu ``Connection`` once given, so
the close gives the messages back, or fails with a connection error that Celery handles (they come
back after the visibility timeout).

:func:`install` registers them under kombu's own scheme names (``redis``, ``rediss``, ``sentinel``):
Celery builds broker connections from the URL's scheme again each time it moves to the next
sentinel URL (``Connection.switch``), and kombu's Sentinel channel recognises its sentinels by the
``sentinel`` scheme, so a class given once to Celery would not last.
"""

from __future__ import annotations

from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis


class _KeepsItsConnection:
    """A transport whose ``client`` (its kombu ``Connection``) is not cleared once set."""

    _kept_client: Any = None

    @property
    def client(self) -> Any:
        return self._kept_client

    @client.setter
    def client(self, value: Any) -> None:
        if value is not None:  # kombu clears it before the channels are closed: keep it for them
            self._kept_client = value


class Transport(_KeepsItsConnection, kombu_redis.Transport):
    """kombu's Redis transport (``redis://``, ``rediss://``), keeping its connection."""


class SentinelTransport(_KeepsItsConnection, kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport (``sentinel://``), keeping its connection."""


ALIASES = {"redis": f"{__name__}:Transport", "rediss": f"{__name__}:Transport",
           "sentinel": f"{__name__}:SentinelTransport"}


def install() -> None:
    """Make the ``redis``, ``rediss`` and ``sentinel`` schemes use these transports in this process
    (idempotent; before any broker connection, so kombu has cached no class for them yet)."""
    aliases: dict[str, str] = kombu.transport.TRANSPORT_ALIASES
    if all(aliases.get(name) == target for name, target in ALIASES.items()):
        return
    aliases.update(ALIASES)
    cache: dict[Any, Any] = getattr(kombu.transport, "_transport_cache", {})
    for name in ALIASES:  # a class resolved before this call would be used instead
        cache.pop(name, None)
