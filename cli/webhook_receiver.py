"""A webhook receiver on 127.0.0.1: `make demo` (`editfarm demo`) receives its signed webhook here.

The one receiver implementation of the project: the test kit (``editfarm_testing.webhooks``) and the
benchmarks use it too, with their own answers (:class:`Reply`: a status, a delay, a dropped
connection). It is product code because the demo needs it at run time; the test kit builds on it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(frozen=True)
class Reply:
    """How the receiver answers one request: ``status`` (with ``headers`` and ``body``) after
    ``delay_s``; ``drop`` closes the connection after ``delay_s`` without any answer."""

    status: int = 204
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0
    drop: bool = False


@dataclass
class Delivery:
    """One request as it arrived (``at_s`` epoch, ``perf_s`` perf_counter) and, once answered, the
    status it got (None: not answered yet, dropped, or the sender was gone before the answer)."""

    at_s: float
    perf_s: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1 that records every request.

    ``requests`` holds every request in arrival order; ``received`` queues those answered 2xx
    (what a real receiver would act on). ``reply`` decides each answer (default: 204);
    ``keep_alive`` speaks HTTP/1.1 with persistent connections (counted in ``connections``).
    """

    def __init__(self, *, reply: Callable[[Delivery], Reply] | None = None, keep_alive: bool = False,
                 path: str = "/hooks/editfarm") -> None:
        self.path = path
        self.reply = reply or (lambda delivery: Reply())
        self.requests: list[Delivery] = []
        self.received: queue.Queue[Delivery] = queue.Queue()
        self.connections = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(keep_alive))
        self.server.daemon_threads = True  # a held (delayed) request never blocks shutdown
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def _handler(self, keep_alive: bool) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver.connections += 1

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                delivery = Delivery(time.time(), time.perf_counter(), self.command, self.path,
                                    {k.lower(): v for k, v in self.headers.items()},
                                    self.rfile.read(int(self.headers.get("content-length", 0))))
                with receiver.lock:  # recorded on arrival: a test sees a request while it is held
                    receiver.requests.append(delivery)
                reply = receiver.reply(delivery)
                time.sleep(reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    return
                delivery.status = self._answer(reply)
                if delivery.status is not None and 200 <= delivery.status < 300:
                    receiver.accepted(delivery)

            do_GET = do_POST  # a redirect the sender followed arrives as GET

            def _answer(self, reply: Reply) -> int | None:
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:  # the sender gave up (its timeout) or stopped reading a long body
                    return None
                return reply.status

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def accepted(self, delivery: Delivery) -> None:
        """A request answered 2xx: queued on ``received`` (subclasses may tally it as well)."""
        self.received.put(delivery)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
