"""broker/redis_conn.py: plain and Sentinel Redis URLs, and clients that follow a real failover.

The failover test runs real processes on loopback: a Redis primary, one replica and three
sentinels (the machine's `redis-server`, in sentinel mode for the sentinels;
``editfarm_testing.sentinel``). The primary is
SIGKILLed; Sentinel promotes the replica; the blocking client, the asyncio client and the Celery
broker connection built from the same URL go on working against it without being rebuilt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.celery_app import make_celery
from broker.redis_conn import (
    RedisURLError,
    async_client_from_url,
    celery_broker,
    client_from_url,
    parse_sentinel_url,
)
from editfarm_testing.sentinel import SentinelGroup


def test_a_plain_url_is_not_sentinel_and_goes_to_celery_as_it_is() -> None:
    assert parse_sentinel_url("redis://127.0.0.1:6379/0") is None
    broker = celery_broker("rediss://:pw@127.0.0.1:6380/2")
    assert broker.url == "rediss://:pw@127.0.0.1:6380/2" and broker.transport_options == {}
    assert broker.use_ssl is None


def test_a_sentinel_url_names_sentinels_master_db_passwords_and_tls() -> None:
    config = parse_sentinel_url("redis+sentinel://:p%40ss@10.0.0.1:26379,[::1]:26380,s3/mymaster/3"
                                "?sentinel_password=sp&ssl=true&ssl_ca_certs=/ca.pem")
    assert config is not None
    assert config.sentinels == (("10.0.0.1", 26379), ("::1", 26380), ("s3", 26379))
    assert config.master_name == "mymaster" and config.db == 3
    assert config.master_kwargs() == {"db": 3, "password": "p@ss", "ssl": True, "ssl_ca_certs": "/ca.pem"}
    assert config.sentinel_kwargs() == {"password": "sp", "ssl": True, "ssl_ca_certs": "/ca.pem"}
    broker = celery_broker("redis+sentinel://:p%40ss@10.0.0.1:26379,[::1]:26380/mymaster/3"
                           "?sentinel_password=sp&ssl=true")
    assert broker.url == "sentinel://:p%40ss@10.0.0.1:26379/3;sentinel://:p%40ss@[::1]:26380/3"
    assert broker.transport_options == {"master_name": "mymaster", "sentinel_kwargs": {"password": "sp",
                                                                                         "ssl": True}}
    assert broker.use_ssl == {"ssl_cert_reqs": "required"}


@pytest.mark.parametrize("url", ["redis+sentinel:///mymaster", "redis+sentinel://127.0.0.1:26379",
                                 "redis+sentinel://127.0.0.1:26379/"])
def test_a_sentinel_url_without_sentinels_or_master_is_refused(url: str) -> None:
    with pytest.raises(RedisURLError):
        parse_sentinel_url(url)


def test_make_celery_uses_the_sentinel_transport_with_the_master_name() -> None:
    app = make_celery("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/0")
    assert app.conf.broker_url.startswith("sentinel://127.0.0.1:26379/0;")
    options = app.conf.broker_transport_options
    assert options["master_name"] == "mymaster" and options["queue_order_strategy"] == "priority"


# -- a real failover ---------------------------------------------------------------------------------


@pytest.fixture()
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    running = SentinelGroup(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def retry(fn, timeout_s: float = 30):  # type: ignore[no-untyped-def]
    """``fn()`` once it stops failing with a connection error (the failover window)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.integration
def test_clients_built_from_one_sentinel_url_follow_a_failover_without_a_restart(group: SentinelGroup) -> None:
    client = client_from_url(group.url, socket_connect_timeout=1, socket_timeout=2)
    client.set("before", "1")
    assert client.wait(1, 5000) == 1  # on the replica too
    celery = make_celery(group.url)
    with celery.connection_for_write() as conn:
        conn.SimpleQueue("sentinel-test").put({"n": 1})

    async def async_set(key: str) -> bytes | None:
        aclient = async_client_from_url(group.url, socket_connect_timeout=1, socket_timeout=2)
        try:
            await aclient.set(key, "a")
            return await aclient.get("before")
        finally:
            await aclient.aclose()

    assert asyncio.run(async_set("async-before")) == b"1"
    old_primary, replica = group.primary().port, group.replica()

    group.kill_primary()
    assert group.wait_promoted(old_primary) == replica.port

    # the same client object: its next connection asks the sentinels, and finds the promoted replica
    assert retry(lambda: client.get("before")) == b"1"
    retry(lambda: client.set("after", "2"))
    assert redis.Redis(port=replica.port).get("after") == b"2"
    assert client.connection_pool.get_master_address()[1] != old_primary
    assert retry(lambda: asyncio.run(async_set("async-after"))) == b"1"
    assert redis.Redis(port=replica.port).get("async-after") == b"a"
    with celery.connection_for_write() as conn:
        queue = conn.SimpleQueue("sentinel-test")
        message = retry(lambda: queue.get(timeout=5))
        assert message.payload == {"n": 1}  # the message queued before the failover survived it
        message.ack()
        queue.put({"n": 2})
        assert queue.get(timeout=5).payload == {"n": 2}
