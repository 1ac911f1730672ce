"""broker/redis_conn.py: plain and Sentinel Redis URLs, and clients that follow a real failover.

The failover test runs real processes on loopback: a Redis primary, one replica and three
sentinels (the machine's `redis-server`, in sentinel mode for the sentinels). The primary is
SIGKILLed; Sentinel promotes the replica; the blocking client, the asyncio client and the Celery
broker connection built from the same URL go on working against it without being rebuilt.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
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
from cli.localservices import (
    ManagedProcess,
    free_port,
    redis_answers,
    redis_server_binary,
    start_redis,
    wait_until,
)


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

MASTER = "editfarm-test"


def start_sentinel(workdir: Path, primary_port: int) -> ManagedProcess:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "sentinel.conf"  # sentinel rewrites its own config file: one per sentinel
    conf.write_text("\n".join([
        f"port {port}", "bind 127.0.0.1", f"dir {workdir}",
        f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2",
        f"sentinel down-after-milliseconds {MASTER} 1000",
        f"sentinel failover-timeout {MASTER} 10000",
        f"sentinel parallel-syncs {MASTER} 1", "",
    ]))
    proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"], stdout=open(workdir / "log", "ab"),
                            stderr=subprocess.STDOUT)
    managed = ManagedProcess("sentinel", proc, port, workdir)
    wait_until(lambda: redis_answers(port), 30, "sentinel")
    return managed


class SentinelGroup:
    def __init__(self, root: Path) -> None:
        self.primary = start_redis(workdir=root / "primary", appendfsync="always")
        self.replica = start_redis(workdir=root / "replica", appendfsync="always")
        redis.Redis(port=self.replica.port).replicaof("127.0.0.1", self.primary.port)
        wait_until(lambda: redis.Redis(port=self.replica.port).info("replication")["master_link_status"] == "up",
                   30, "replica in sync")
        self.sentinels = [start_sentinel(root / f"sentinel{i}", self.primary.port) for i in range(3)]
        # every sentinel knows the replica and the other sentinels before a failover can be agreed on
        wait_until(lambda: all(self._settled(s.port) for s in self.sentinels), 30, "sentinels settled")

    def _settled(self, port: int) -> bool:
        [master] = redis.Redis(port=port, decode_responses=True).sentinel_masters().values()
        return int(master["num-slaves"]) == 1 and int(master["num-other-sentinels"]) == 2

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def master_port(self) -> int:
        host, port = redis.Redis(port=self.sentinels[0].port).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def stop(self) -> None:
        for managed in [*self.sentinels, self.replica, self.primary]:
            managed.stop()


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
    old_primary = group.primary.port

    group.primary.proc.send_signal(signal.SIGKILL)
    group.primary.proc.wait()
    wait_until(lambda: group.master_port() == group.replica.port, 60, "sentinels promote the replica")

    # the same client object: its next connection asks the sentinels, and finds the promoted replica
    assert retry(lambda: client.get("before")) == b"1"
    retry(lambda: client.set("after", "2"))
    assert redis.Redis(port=group.replica.port).get("after") == b"2"
    assert client.connection_pool.get_master_address()[1] != old_primary
    assert retry(lambda: asyncio.run(async_set("async-after"))) == b"1"
    assert redis.Redis(port=group.replica.port).get("async-after") == b"a"
    with celery.connection_for_write() as conn:
        queue = conn.SimpleQueue("sentinel-test")
        message = retry(lambda: queue.get(timeout=5))
        assert message.payload == {"n": 1}  # the message queued before the failover survived it
        message.ack()
        queue.put({"n": 2})
        assert queue.get(timeout=5).payload == {"n": 2}
