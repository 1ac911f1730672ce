"""Server-Sent Events of one job: ``GET /v1/jobs/{id}/events``.

The route subscribes to the job's event channel *first*, then reads the job
record, so nothing published in between is lost; the stream starts with the
current state. Frames (each with an ``id:`` counter; the first also carries
``retry:``):

- ``event: status``: the full job view (as GET /v1/jobs/{id}), first on
  connect and again after every status change.
- ``event: progress``: ``{"step", "total"}``, at most one per
  ``sse_progress_interval_s`` (the latest one is sent when the interval ends;
  the last step always goes out at once).
- ``event: preview``: ``{"step", "key", "url"}``, a small preview image with a
  presigned ``url``.
- ``event: done``: the final job view, after the terminal ``status``; the
  server then closes the stream.
- ``: ping`` comment lines when nothing was sent for ``sse_keepalive_s``.

Pub/sub is a live feed only: on each keepalive tick the record is re-read, and
a status change the feed missed is sent as if it had been published. A stream
ends after ``sse_max_duration_s`` (the client reconnects and gets the current
state first). The subscription is closed however the stream ends, including a
client that went away.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.events import Subscription
from api.settings import ApiSettings
from broker import events
from broker.schema import Job, JobStatus

logger = logging.getLogger("editfarm.api")

PREVIEW = "preview"
SSE_HEADERS = {
    "Cache-Control": "no-store",  # views carry presigned URLs
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class JobEventStream:
    """The SSE frames of one job, as an async iterator of text chunks."""

    def __init__(
        self,
        *,
        first: Job,
        subscription: Subscription,
        read: Callable[[], Awaitable[Job | None]],
        render: Callable[[Job], Awaitable[dict[str, Any]]],
        presign: Callable[[str], str],
        settings: ApiSettings,
    ) -> None:
        self.first = first
        self.subscription = subscription
        self.read = read
        self.render = render
        self.presign = presign
        self.progress_interval = settings.sse_progress_interval_s
        self.keepalive = settings.sse_keepalive_s
        self.retry_ms = settings.sse_retry_ms
        self.max_duration = settings.sse_max_duration_s
        self.preview_prefix = f"tenants/{first.tenant}/jobs/{first.id}/"
        self._counter = 0

    def frame(self, event: str, data: Mapping[str, Any], retry_ms: int | None = None) -> str:
        self._counter += 1
        lines = [] if retry_ms is None else [f"retry: {retry_ms}"]
        lines += [f"id: {self._counter}", f"event: {event}",
                  "data: " + json.dumps(data, separators=(",", ":"))]
        return "\n".join(lines) + "\n\n"

    async def _status_frames(self, job: Job) -> list[str]:
        """``status`` with the full view, and ``done`` too if the job is terminal."""
        view = await self.render(job)
        frames = [self.frame("status", view)]
        if job.status.is_terminal:
            frames.append(self.frame("done", view))
        return frames

    def _progress(self, data: Mapping[str, Any]) -> dict[str, int] | None:
        step, total = _as_int(data.get("step")), _as_int(data.get("total"))
        return None if step is None or total is None else {"step": step, "total": total}

    def _preview(self, data: Mapping[str, Any]) -> dict[str, Any] | None:
        key = data.get("key")
        # only this job's own objects are ever presigned
        if not isinstance(key, str) or not key.startswith(self.preview_prefix) or ".." in key:
            return None
        try:
            url = self.presign(key)
        except Exception:  # noqa: BLE001 - a preview is best effort
            logger.warning("could not presign a preview of %s", self.first.id)
            return None
        return {"step": _as_int(data.get("step")), "key": key, "url": url}

    async def __aiter__(self) -> AsyncGenerator[str, None]:
        try:
            async for chunk in self._frames():
                yield chunk
        except Exception as exc:  # noqa: BLE001 - the response has started: end the stream, the client retries
            logger.warning("event stream of %s ended: %s", self.first.id, type(exc).__name__)

    async def _frames(self) -> AsyncGenerator[str, None]:
        clock = time.monotonic
        end = clock() + self.max_duration
        view = await self.render(self.first)
        yield self.frame("status", view, retry_ms=self.retry_ms)
        if self.first.status.is_terminal:
            yield self.frame("done", view)
            return
        last_status: JobStatus = self.first.status
        next_ping = clock() + self.keepalive
        last_progress = float("-inf")
        pending: dict[str, int] | None = None

        while True:
            now = clock()
            if now >= end:
                return
            wake = min(next_ping, end)
            if pending is not None:
                wake = min(wake, last_progress + self.progress_interval)
            event = await self.subscription.get(max(0.0, wake - now))
            now = clock()
            out: list[str] = []

            if event is None:
                if pending is not None and now >= last_progress + self.progress_interval:
                    out.append(self.frame("progress", pending))
                    pending, last_progress = None, now
                elif now >= next_ping:
                    # the feed is lossy: catch a status change it did not carry
                    job = await self.read()
                    if job is None:
                        return
                    if job.status is not last_status:
                        pending, last_status = None, job.status
                        out += await self._status_frames(job)
                    else:
                        out.append(": ping\n\n")
            elif event["type"] == events.PROGRESS:
                progress = self._progress(event["data"])
                if progress is not None:
                    last_step = progress["total"] > 0 and progress["step"] >= progress["total"]
                    if last_step or now - last_progress >= self.progress_interval:
                        out.append(self.frame("progress", progress))
                        pending, last_progress = None, now
                    else:
                        pending = progress
            elif event["type"] == PREVIEW:
                preview = self._preview(event["data"])
                if preview is not None:
                    out.append(self.frame("preview", preview))
            elif event["type"] == events.STATUS:
                job = await self.read()
                if job is None:
                    return
                pending, last_status = None, job.status  # the view carries the progress
                out += await self._status_frames(job)

            for chunk in out:
                yield chunk
            if out:
                next_ping = clock() + self.keepalive
                if last_status.is_terminal:
                    return


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that always closes its subscription.

    However the stream ends (done, max duration, the client disconnecting and
    the stream task being cancelled, a failed send), the Redis connection is
    released at once.
    """

    def __init__(self, stream: JobEventStream, subscription: Subscription,
                 headers: Mapping[str, str] | None = None) -> None:
        self._iterator = stream.__aiter__()
        super().__init__(self._iterator, headers={**SSE_HEADERS, **(headers or {})},
                         media_type="text/event-stream")
        self.subscription = subscription

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # Servers may drop writes to a closed connection silently (uvicorn does), so a gone
            # client is only noticed by listening for http.disconnect: stop the stream then.
            async with anyio.create_task_group() as group:
                async def stream_then_stop() -> None:
                    await super(EventStreamResponse, self).__call__(scope, receive, send)
                    group.cancel_scope.cancel()

                async def stop_on_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                group.start_soon(stop_on_disconnect)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._iterator.aclose()
                except Exception as exc:  # noqa: BLE001 - cleaning up a stream that already failed
                    logger.debug("closing an event stream: %s", type(exc).__name__)
                await self.subscription.close()
