"""broker/transport.py: a Celery worker's channel that outlives its kombu connection (a lost broker
connection: Redis restarted, a Sentinel failover) still gives back the message it holds unacked."""

from __future__ import annotations

import kombu.transport
import pytest
import redis

from broker import transport
from broker.celery_app import make_celery
from cli.localservices import ManagedProcess


def test_our_transports_serve_the_redis_and_sentinel_schemes() -> None:
    app = make_celery("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/0")
    assert type(app.connection_for_write().transport) is transport.SentinelTransport  # no network yet
    assert type(make_celery("redis://127.0.0.1:6379/0").connection_for_write().transport) is transport.Transport
    for name, target in transport.ALIASES.items():
        assert kombu.transport.TRANSPORT_ALIASES[name] == target
    transport.install()  # idempotent
    assert kombu.transport.get_transport_cls("sentinel") is transport.SentinelTransport


@pytest.mark.parametrize("keeps", [True, False], ids=["ours", "kombu's"])
def test_a_channel_closed_after_its_connection_let_go_gives_back_its_unacked_message(
        redis_server: ManagedProcess, redis_client: redis.Redis, keeps: bool) -> None:
    app = make_celery(f"redis://127.0.0.1:{redis_server.port}/0")
    conn = app.connection_for_write(transport=None if keeps else "kombu.transport.redis:Transport")
    with conn:
        channel = conn.channel()
        queue = conn.SimpleQueue("transport-test", channel=channel)
        queue.put({"n": 1})
        queue.get(timeout=5)  # delivered, not acknowledged (a task in progress, acks_late)
        # what kombu's Connection does first when Celery drops a lost broker connection, before
        # the worker's channels are closed
        conn.transport.client = None
        if not keeps:
            with pytest.raises(AttributeError):  # kombu's own transport: the worker exits
                channel.close()
            return
        channel.close()
    with app.connection_for_write() as again:
        message = again.SimpleQueue("transport-test").get(timeout=5)
        assert message.payload == {"n": 1}  # given back, not lost with the worker
        message.ack()
