"""A Redis replica of a local Redis, as a real ``redis-server --replicaof`` process on loopback: for
the tests and benchmarks of ``EDITFARM_REDIS_MIN_REPLICAS`` (a primary's writes confirmed by ``WAIT``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from broker import keys
from cli.localservices import ManagedProcess, free_port, redis_server_binary, wait_until


def start_replica(primary_port: int, workdir: Path, port: int | None = None) -> ManagedProcess:
    """Start a replica of ``127.0.0.1:primary_port`` and wait until the primary counts it online
    (its full sync done) and it has acknowledged a write: just after a sync its first ack can take
    up to a second (the replica's once-a-second ``REPLCONF ACK``), longer than the tests' ``WAIT``."""
    port = port or free_port()
    with redis.Redis(port=primary_port) as setup:
        setup.config_set("repl-diskless-sync-delay", 0)  # sync at once, not after Redis's 5 s default
    workdir.mkdir(parents=True, exist_ok=True)
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--protected-mode", "yes",
            "--replicaof", "127.0.0.1", str(primary_port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    managed = ManagedProcess("redis-replica", proc, port, workdir)
    primary = redis.Redis(port=primary_port)
    try:
        wait_until(lambda: _online(primary, port), 30, "redis replica")
        wait_until(lambda: _acknowledges(primary), 30, "redis replica ack")
    except BaseException:
        managed.stop()
        raise
    finally:
        primary.close()
    return managed


def _online(primary: redis.Redis, replica_port: int) -> bool:
    info = primary.info("replication")
    for name, value in info.items():
        if name.startswith("slave") and isinstance(value, dict) and int(value.get("port", 0)) == replica_port:
            return bool(value.get("state") == "online")
    return False


def _acknowledges(primary: redis.Redis) -> bool:
    pipe = primary.pipeline(transaction=False)
    pipe.set(keys.REPLICA_PROBE, "replica-start", px=10_000)
    pipe.execute_command("WAIT", 1, 2000)
    return int(pipe.execute()[1]) >= 1


def wait_replica_gone(primary: redis.Redis) -> None:
    """Until the primary no longer counts a stopped replica as connected."""
    wait_until(lambda: int(primary.info("replication")["connected_slaves"]) == 0, 30, "replica disconnect")
