"""Webhook receivers for tests and benchmarks: the product's one receiver
(:class:`cli.webhook_receiver.WebhookReceiver`, which `make demo` uses) with the answers only tests
give: switchable failures (:class:`FlakyReceiver`), answers in a scripted order
(:class:`ScriptedReceiver`); and the deliveries it received grouped by job (:class:`ByJob`).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterable

from cli.localservices import wait_until
from cli.webhook_receiver import Delivery, Reply, WebhookReceiver

__all__ = ["ByJob", "Delivery", "FlakyReceiver", "Reply", "ScriptedReceiver", "WebhookReceiver",
           "TERMINAL_TYPES"]

TERMINAL_TYPES = ("job.succeeded", "job.failed", "job.canceled")


class FlakyReceiver(WebhookReceiver):
    """A receiver whose answer is switchable: ``mode`` ``"ok"`` answers 204, ``"error"`` 500,
    ``"hang"`` holds the request ``hang_s`` seconds and then drops the connection unanswered (the
    sender times out)."""

    def __init__(self, hang_s: float = 8.0) -> None:
        self.mode = "ok"
        self.hang_s = hang_s
        super().__init__(reply=self._by_mode)

    def _by_mode(self, delivery: Delivery) -> Reply:
        if self.mode == "hang":
            return Reply(drop=True, delay_s=self.hang_s)
        return Reply(204 if self.mode == "ok" else 500)


class ScriptedReceiver(WebhookReceiver):
    """Answers with ``script``'s replies in turn (appended to at any time), then with ``then``."""

    def __init__(self, *, then: Reply | None = None, keep_alive: bool = False, path: str = "/hook") -> None:
        self.script: list[Reply] = []
        self.then = then or Reply(200, body=b"ok")
        self._script_lock = threading.Lock()
        super().__init__(reply=self._next, keep_alive=keep_alive, path=path)

    def _next(self, delivery: Delivery) -> Reply:
        with self._script_lock:
            return self.script.pop(0) if self.script else self.then

    def wait_for(self, count: int, timeout_s: float = 20) -> None:
        """Until ``count`` requests arrived in all. Raises TimeoutError."""
        wait_until(lambda: len(self.requests) >= count, timeout_s, f"{count} webhook requests", interval_s=0.02)


class ByJob:
    """The deliveries a receiver accepted (answered 2xx), grouped by the job id in their payload."""

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        self.by_job: dict[str, list[Delivery]] = {}

    def drain(self, wait_s: float = 0.0) -> None:
        """Take what arrived; wait up to ``wait_s`` for the first one, not for more."""
        try:
            while True:
                got = self.receiver.received.get(timeout=wait_s) if wait_s else \
                    self.receiver.received.get_nowait()
                self.by_job.setdefault(json.loads(got.body)["data"]["id"], []).append(got)
                wait_s = 0.0
        except queue.Empty:
            pass

    def for_job(self, job_id: str, at_least: int = 1, timeout_s: float = 30,
                settle_s: float = 1.0) -> list[Delivery]:
        """Deliveries for ``job_id`` once at least ``at_least`` came, and ``settle_s`` more for any other."""
        deadline = time.monotonic() + timeout_s
        while len(self.by_job.get(job_id, [])) < at_least and time.monotonic() < deadline:
            self.drain(0.1)
        self._settle(settle_s)
        return self.by_job.get(job_id, [])

    def terminal(self, job_id: str) -> list[Delivery]:
        return [d for d in self.by_job.get(job_id, []) if json.loads(d.body)["type"] in TERMINAL_TYPES]

    def wait_terminal(self, job_ids: Iterable[str], timeout_s: float = 60, settle_s: float = 1.5) -> None:
        """Until every job has a terminal delivery, then ``settle_s`` more for any duplicate."""
        job_ids = list(job_ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(not self.terminal(j) for j in job_ids):
            self.drain(0.1)
        self._settle(settle_s)

    def _settle(self, settle_s: float) -> None:
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            self.drain(0.1)
