"""A daemon thread that runs one pass of some housekeeping every ``interval_s`` (the reaper, the
retention sweepers): a failed pass is logged and the next one runs, so a Redis or S3 blip never ends it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("editfarm.worker")


class Periodic:
    """Calls ``task`` every ``interval_s`` on a daemon thread named ``name`` once started, until stopped."""

    def __init__(self, *, name: str, interval_s: float, task: Callable[[], object]) -> None:
        self.name, self.interval_s, self.task = name, interval_s, task
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.task()
            except Exception:  # noqa: BLE001 - keep going through Redis or S3 blips
                log.exception("%s: pass failed", self.name)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
