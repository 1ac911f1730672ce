"""What tests and benchmarks do to a running :class:`cli.cluster.LocalCluster` and the product never
does: restart its Redis or its API, find a render worker's pool child, read a process's log.

Functions taking the cluster rather than methods on it: only tests and benchmarks crash a
cluster's services on purpose or look inside its processes.
"""

from __future__ import annotations

import signal
import subprocess
import time

import httpx

from cli.cluster import LocalCluster
from cli.localservices import start_redis, wait_until


def restart_redis(cluster: LocalCluster, sig: int = signal.SIGTERM, down_s: float = 0.0) -> None:
    """Stop the cluster's own Redis with ``sig`` (SIGKILL: a crash), stay down ``down_s`` seconds,
    then start it again on the same port and folder: it reloads its append-only file.

    Raises:
        AssertionError: the cluster was given an outside Redis (it has none of its own to restart).
    """
    assert cluster.redis is not None, "the cluster was given an outside Redis"
    old = cluster.redis
    old.proc.send_signal(sig)
    try:
        old.proc.wait(30)
    except subprocess.TimeoutExpired:
        old.proc.kill()
        old.proc.wait()
    if down_s > 0:
        time.sleep(down_s)
    cluster.redis = start_redis(port=old.port, workdir=old.workdir, log=cluster.workdir / "logs" / "redis.log",
                                appendfsync=cluster.config.redis_appendfsync)


def restart_api(cluster: LocalCluster, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
    """Stop the API with ``sig`` and start it again on the same port; waits until it is ready.

    Raises:
        TimeoutError: the API did not answer ``/readyz`` within ``timeout_s``.
    """
    cluster.stop_process("api", sig)
    cluster.start_api()
    wait_until(lambda: httpx.get(f"{cluster.api_url}/readyz", timeout=2).status_code == 200, timeout_s, "API")


def worker_child_pid(cluster: LocalCluster, name: str) -> int:
    """PID of a render worker's pool child (the process holding the model), from its ready file.

    Raises:
        FileNotFoundError: the worker has not written its ready file (yet).
    """
    return int((cluster.workdir / "ready" / f"{name}.ready").read_text())


def process_log(cluster: LocalCluster, name: str) -> str:
    """What the cluster's process ``name`` (``api``, ``render0``, …) wrote so far; "" before it wrote."""
    path = cluster.workdir / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""
