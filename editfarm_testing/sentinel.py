"""A Redis primary, one replica and three sentinels as real processes on loopback (the machine's
``redis-server``, in sentinel mode for the sentinels), for the failover tests: kill the primary, let
Sentinel promote the replica, bring the killed node back as the new primary's replica.

Either node may be the primary at any time; :meth:`SentinelGroup.primary` asks the sentinels.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis

from broker import keys
from cli.localservices import ManagedProcess, free_port, redis_answers, redis_server_binary, wait_until

MASTER = "editfarm-test"


def start_node(workdir: Path, port: int | None = None, replica_of: int | None = None,
               appendfsync: str = "always") -> ManagedProcess:
    """A Redis node with AOF (``appendfsync``), full syncs at once; a replica of ``127.0.0.1:replica_of``."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync, "--protected-mode", "yes",
            # a (re)joining replica syncs at once, not after Redis's 5 s default
            "--repl-diskless-sync-delay", "0"]
    if replica_of is not None:
        args += ["--replicaof", "127.0.0.1", str(replica_of)]
    proc = subprocess.Popen(args, stdout=open(workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)
    managed = ManagedProcess("redis", proc, port, workdir)
    wait_until(lambda: redis_answers(port), 30, "redis node")
    return managed


def start_sentinel(workdir: Path, primary_port: int, *, down_after_ms: int,
                   failover_timeout_ms: int) -> ManagedProcess:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "sentinel.conf"  # sentinel rewrites its own config file: one per sentinel
    conf.write_text("\n".join([
        f"port {port}", "bind 127.0.0.1", f"dir {workdir}",
        f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2",
        f"sentinel down-after-milliseconds {MASTER} {down_after_ms}",
        f"sentinel failover-timeout {MASTER} {failover_timeout_ms}",
        f"sentinel parallel-syncs {MASTER} 1", "",
    ]))
    proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"], stdout=open(workdir / "log", "ab"),
                            stderr=subprocess.STDOUT)
    managed = ManagedProcess("sentinel", proc, port, workdir)
    wait_until(lambda: redis_answers(port), 30, "sentinel")
    return managed


class SentinelGroup:
    """Two Redis nodes (primary + replica, AOF with ``appendfsync``) and three sentinels (quorum 2).

    ``down_after_ms``: how long the primary must not answer before a sentinel calls it down.
    """

    def __init__(self, root: Path, *, appendfsync: str = "always", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000) -> None:
        self.root, self.appendfsync = root, appendfsync
        first = start_node(root / "node0", appendfsync=appendfsync)
        self.nodes: dict[int, ManagedProcess] = {first.port: first}
        self.sentinels: list[ManagedProcess] = []
        try:
            second = start_node(root / "node1", replica_of=first.port, appendfsync=appendfsync)
            self.nodes[second.port] = second
            self.sentinels = [start_sentinel(root / f"sentinel{i}", first.port, down_after_ms=down_after_ms,
                                             failover_timeout_ms=failover_timeout_ms) for i in range(3)]
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The group's ``redis+sentinel://`` URL (db 0)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def master_port(self, sentinel: int = 0) -> int:
        """The primary's port as one sentinel sees it."""
        with redis.Redis(port=self.sentinels[sentinel].port) as client:
            _host, port = client.sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def primary(self) -> ManagedProcess:
        return self.nodes[self.master_port()]

    def replica(self) -> ManagedProcess:
        [other] = [n for port, n in self.nodes.items() if port != self.master_port()]
        return other

    def wait_healthy(self, timeout_s: float = 60) -> None:
        """Until every sentinel names the same primary, which has its replica online and acknowledging
        writes, and knows the other sentinels and one replica that is not down."""
        def healthy() -> bool:
            ports = {self.master_port(i) for i in range(len(self.sentinels))}
            if len(ports) != 1:
                return False
            (port,) = ports
            return self._replica_acks(port) and all(self._sentinel_settled(s.port, port) for s in self.sentinels)
        wait_until(healthy, timeout_s, "sentinel group healthy", interval_s=0.1)

    def _replica_acks(self, primary_port: int) -> bool:
        with redis.Redis(port=primary_port, socket_timeout=3) as primary:
            if int(primary.info("replication")["connected_slaves"]) < 1:
                return False
            pipe = primary.pipeline(transaction=False)
            pipe.set(keys.REPLICA_PROBE, "sentinel-group", px=10_000)
            pipe.execute_command("WAIT", 1, 1000)
            return int(pipe.execute()[1]) >= 1

    @staticmethod
    def _sentinel_settled(sentinel_port: int, primary_port: int) -> bool:
        with redis.Redis(port=sentinel_port, decode_responses=True) as client:
            master = client.sentinel_master(MASTER)
            if int(master["port"]) != primary_port or int(master["num-other-sentinels"]) != 2:
                return False
            replicas = client.sentinel_slaves(MASTER)
        return any(not ({"s_down", "o_down", "disconnected"} & set(str(r["flags"]).split(",")))
                   for r in replicas)

    def kill_primary(self) -> ManagedProcess:
        """SIGKILL the primary (a lost machine); returns it, dead."""
        victim = self.primary()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        return victim

    def wait_promoted(self, old_port: int, timeout_s: float = 60) -> int:
        """Until every sentinel names another primary than ``old_port``; returns its port."""
        wait_until(lambda: all(self.master_port(i) != old_port for i in range(len(self.sentinels))), timeout_s,
                   "sentinels promote the replica", interval_s=0.05)
        return self.master_port()

    def rejoin(self, dead: ManagedProcess) -> ManagedProcess:
        """Start a killed node again on its port and folder as the current primary's replica (what a
        restarted pod of a Sentinel chart does), then wait until the group is healthy."""
        node = start_node(dead.workdir, port=dead.port, replica_of=self.master_port(), appendfsync=self.appendfsync)
        self.nodes[node.port] = node
        self.wait_healthy()
        return node

    def stop(self) -> None:
        for managed in [*self.sentinels, *self.nodes.values()]:
            managed.stop()
