"""A loopback TCP forwarder that can be switched off, to make a server look unreachable (the fault
tests and benchmarks put it between the cluster and Redis, S3 or a webhook receiver)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from typing import Self

from cli.localservices import free_port


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
