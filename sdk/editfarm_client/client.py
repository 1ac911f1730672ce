"""The clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio). Both have the same methods."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from editfarm_client._base import (
    Box,
    RequestSpec,
    RetryPolicy,
    SubmitOptions,
    UploadMode,
    build_submit,
    cancel_spec,
    check_integrity,
    decode_sse,
    default_headers,
    error_from_response,
    inpaint_check,
    job_from,
    job_id_of,
    list_spec,
    models_from,
    output_filename,
    outputs_of,
    page_from,
    resolve_config,
    sse_retry_delay,
    stream_timeout,
    submit_fields,
    write_atomic,
)
from editfarm_client._sse import SSEParser
from editfarm_client._uploads import ImageInput
from editfarm_client.errors import APIConnectionError, APIError, EditfarmError, WaitTimeout
from editfarm_client.models import (
    DoneEvent,
    Job,
    JobEvent,
    JobPage,
    Model,
    Operation,
    Output,
    OutputFormat,
    Priority,
    WebhookEventName,
)

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack


def _download_url(output: Output) -> str:
    """The output's URL. Raises EditfarmError when it has none (its job's data was removed)."""
    if not output.url:
        raise EditfarmError(f"{output.key} has no URL: the job's data was removed by its retention")
    return output.url


class _Common:
    """Configuration shared by both clients."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        *,
        timeout_s: float,
        max_retries: int,
        max_retry_wait_s: float,
        upload: UploadMode,
        stream_read_timeout_s: float,
        headers: Mapping[str, str] | None,
    ) -> None:
        if upload not in ("auto", "multipart", "json"):
            raise ValueError("upload must be 'auto', 'multipart' or 'json'")
        self.base_url, api_key = resolve_config(base_url, api_key)
        self.timeout_s = timeout_s
        self.upload = upload
        self.retry = RetryPolicy(max_retries=max(0, max_retries), max_wait_s=max_retry_wait_s)
        self._headers = default_headers(api_key, headers)
        self._stream_timeout = stream_timeout(timeout_s, stream_read_timeout_s)

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"


class Client(_Common):
    """A blocking client of the editfarm job API.

    ``base_url`` defaults to ``$EDITFARM_API_URL`` (else ``http://127.0.0.1:8000``),
    ``api_key`` to ``$EDITFARM_API_KEY``. ``timeout_s`` bounds each HTTP request;
    ``max_retries`` is how often a request refused with 429/503 (or a connection
    that could not be made) is retried, waiting what ``Retry-After`` says (at most
    ``max_retry_wait_s``; a longer ``Retry-After`` raises at once). ``upload``
    chooses the request encoding of submits (see :meth:`submit`). ``transport``
    (an ``httpx.BaseTransport``) replaces the network, e.g. ``httpx.MockTransport``
    in tests. Use it as a context manager, or call :meth:`close`.

    >>> with Client("http://127.0.0.1:8000", api_key="...") as client:  # doctest: +SKIP
    ...     job = client.edit("cat.png", "give the cat a red hat", seed=7)
    ...     job = client.wait(job, timeout_s=600).raise_for_status()
    ...     paths = client.download(job, "out/")
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_retry_wait_s: float = 60.0,
        upload: UploadMode = "auto",
        stream_read_timeout_s: float = 90.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: bool | str = True,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s=timeout_s, max_retries=max_retries,
                         max_retry_wait_s=max_retry_wait_s, upload=upload,
                         stream_read_timeout_s=stream_read_timeout_s, headers=headers)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport, verify=verify)
        # presigned output URLs carry their own credentials: never send the API key there
        self._downloads = httpx.Client(timeout=timeout_s, transport=transport, verify=verify,
                                       follow_redirects=True)
        self._sleep: Callable[[float], None] = time.sleep

    # -- plumbing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pools."""
        self._http.close()
        self._downloads.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        """Send with retries; a 2xx response (open, when ``stream``) or a typed error."""
        attempt = 0
        while True:
            request = spec.build(self._http, self._headers, self._stream_timeout if stream else None)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.delay_for_error(attempt, spec, exc)
                if delay is None:
                    raise APIConnectionError(f"{spec.method} {spec.path}: {type(exc).__name__}: {exc}") from exc
                self._sleep(delay)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            body = response.read()
            response.close()
            delay = self.retry.delay_for_response(attempt, spec, response)
            if delay is None:
                raise error_from_response(response, body)
            self._sleep(delay)
            attempt += 1

    # -- jobs --------------------------------------------------------------------------------

    def submit(
        self,
        operation: Operation = "edit",
        *,
        model: str | None = None,
        prompt: str | None = None,
        image: ImageInput | None = None,
        images: Sequence[ImageInput] | None = None,
        mask: ImageInput | None = None,
        boxes: Sequence[Box] | None = None,
        outpaint: Mapping[str, int] | None = None,
        move: Mapping[str, Any] | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        true_cfg_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        strength: float | None = None,
        num_images: int | None = None,
        loras: Sequence[Any] | None = None,
        output_format: OutputFormat | None = None,
        output_quality: int | None = None,
        dpi: int | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[WebhookEventName] | None = None,
        priority: Priority | None = None,
        timeout_s: float | None = None,
        queue_deadline_s: float | None = None,
        idempotency_key: str | None = None,
        extra_fields: Mapping[str, Any] | None = None,
    ) -> Job:
        """Submit a job (``POST /v1/jobs``) and return it as accepted (``queued``).

        Parameters left at None are not sent (the server's defaults apply).

        - ``operation``: ``edit`` (default), ``generate``, ``inpaint``, ``outpaint``, ``move``,
          ``upscale`` — whichever the server supports (else :class:`BadRequest` ``unknown_operation``).
        - ``model``: the model to render with, by name (see :meth:`models`); None: the catalog's
          default for the operation. ``job.model`` says which one it got.
        - ``prompt``: the instruction; ``negative_prompt``: what to avoid.
        - ``image``: the input image: a file path, bytes, a binary file object, a PIL image, or an
          ``https://``/``data:`` URL (sent for the server to fetch). ``images``: reference images
          (same kinds). ``mask``: an image, white where to repaint.
        - ``boxes``: regions ``[[x0, y0, x1, y1], ...]``, relative to the image (0..1).
        - ``outpaint``: ``{"left", "right", "top", "bottom"}`` pixels to add; ``move``:
          ``{"box": [x0, y0, x1, y1], "dx", "dy", "scale"}``.
        - ``seed`` (0..2³²-1; the server picks and records one if omitted), ``steps`` (2..100),
          ``true_cfg_scale``, ``width``/``height``, ``strength``, ``num_images``, ``loras``.
        - ``output_format`` (``png``/``jpeg``/``webp``), ``output_quality``, ``dpi``.
        - ``webhook``: an ``https://`` URL to POST the signed result to; ``webhook_events``:
          ``started``/``progress``/``completed``.
        - ``priority`` (``high``/``normal``/``low``), ``timeout_s`` (max run time),
          ``queue_deadline_s`` (canceled if not started by then).
        - ``idempotency_key``: sent as ``Idempotency-Key`` (a random one is used otherwise).
        - ``extra_fields``: more fields sent as-is, for server features newer than this client.

        Encoding: with ``upload="auto"`` a request with local images and only plain fields is sent
        as ``multipart/form-data`` (the files as file parts); one with structured fields
        (``boxes``, ``outpaint``, ``move``, ``loras``) as JSON with the images inlined as
        ``data:`` URLs.

        Raises :class:`BadRequest` (``.code`` e.g. ``invalid_image``, ``.param`` the field;
        ``unknown_model`` for a model the cluster does not have, ``unsupported_operation`` for one
        that does not serve the operation, both with ``.param == "model"``),
        :class:`Unauthorized`, :class:`RateLimited`/:class:`Unavailable` once retries are spent,
        :class:`APIConnectionError`; FileNotFoundError for a missing file.
        """
        fields = submit_fields(
            operation, model=model, prompt=prompt, image=image, images=images, mask=mask, boxes=boxes,
            outpaint=outpaint, move=move, negative_prompt=negative_prompt, seed=seed, steps=steps,
            true_cfg_scale=true_cfg_scale, width=width, height=height, strength=strength,
            num_images=num_images, loras=loras, output_format=output_format, output_quality=output_quality,
            dpi=dpi, webhook=webhook, webhook_events=webhook_events, priority=priority, timeout_s=timeout_s,
            queue_deadline_s=queue_deadline_s, extra_fields=extra_fields)
        spec = build_submit(fields, self.upload, idempotency_key)
        return job_from(self._send(spec))

    def edit(self, image: ImageInput, prompt: str, *, images: Sequence[ImageInput] | None = None,
             boxes: Sequence[Box] | None = None, mask: ImageInput | None = None,
             **options: Unpack[SubmitOptions]) -> Job:
        """Edit ``image`` as ``prompt`` says (``operation="edit"``); see :meth:`submit` for ``options``."""
        return self.submit("edit", image=image, prompt=prompt, images=images, boxes=boxes, mask=mask,
                           **options)

    def generate(self, prompt: str, **options: Unpack[SubmitOptions]) -> Job:
        """Text-to-image (``operation="generate"``); ``width``/``height`` set the size."""
        return self.submit("generate", prompt=prompt, **options)

    def inpaint(self, image: ImageInput, prompt: str, *, mask: ImageInput | None = None,
                boxes: Sequence[Box] | None = None, **options: Unpack[SubmitOptions]) -> Job:
        """Repaint the ``mask``ed (white) area or the ``boxes`` of ``image``. Raises ValueError with neither."""
        inpaint_check(mask, boxes)
        return self.submit("inpaint", image=image, prompt=prompt, mask=mask, boxes=boxes, **options)

    def outpaint(self, image: ImageInput, prompt: str | None = None, *, left: int = 0, right: int = 0,
                 top: int = 0, bottom: int = 0, **options: Unpack[SubmitOptions]) -> Job:
        """Extend ``image`` by the given number of pixels on each side."""
        return self.submit("outpaint", image=image, prompt=prompt,
                           outpaint={"left": left, "right": right, "top": top, "bottom": bottom}, **options)

    def move(self, image: ImageInput, box: Box, *, dx: float, dy: float, scale: float | None = None,
             prompt: str | None = None, **options: Unpack[SubmitOptions]) -> Job:
        """Move the object in ``box`` (relative ``[x0, y0, x1, y1]``) by ``dx``/``dy`` (pixels), optionally
        rescaling it."""
        spec: dict[str, Any] = {"box": list(box), "dx": dx, "dy": dy}
        if scale is not None:
            spec["scale"] = scale
        return self.submit("move", image=image, prompt=prompt, move=spec, **options)

    def upscale(self, image: ImageInput, *, prompt: str | None = None, **options: Unpack[SubmitOptions]) -> Job:
        """Upscale ``image`` (``width``/``height`` in ``options`` give the target size where supported)."""
        return self.submit("upscale", image=image, prompt=prompt, **options)

    def get(self, job: Job | str) -> Job:
        """The job as it is now (``GET /v1/jobs/{id}``). Raises :class:`NotFound`."""
        return job_from(self._send(RequestSpec("GET", f"/v1/jobs/{job_id_of(job)}")))

    def models(self) -> builtins.list[Model]:
        """The models jobs may name (``GET /v1/models``), in catalog order, each with its pool's live
        state (workers ready, jobs queued and running, median render seconds).

        Raises :class:`Unauthorized`, :class:`NotFound` from a server older than the model catalog,
        :class:`Unavailable` once retries are spent, :class:`APIConnectionError`.
        """
        return models_from(self._send(RequestSpec("GET", "/v1/models")))

    def list_page(self, *, status: str | Sequence[str] | None = None, limit: int = 20,
                  cursor: str | None = None) -> JobPage:
        """One page of your jobs, newest first (``GET /v1/jobs``); pass ``next_cursor`` back as ``cursor``."""
        return page_from(self._send(list_spec(status, limit, cursor)).json())

    def list(self, *, status: str | Sequence[str] | None = None, page_size: int = 50,
             max_jobs: int | None = None) -> Iterator[Job]:
        """Iterate over your jobs, newest first, fetching pages as needed.

        ``status`` filters (``"succeeded"`` or ``["queued", "running"]``); ``max_jobs`` stops early.
        """
        cursor: str | None = None
        count = 0
        while True:
            page = self.list_page(status=status, limit=page_size, cursor=cursor)
            for job in page.jobs:
                if max_jobs is not None and count >= max_jobs:
                    return
                count += 1
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job: Job | str, *, reason: str | None = None) -> Job:
        """Cancel a queued or running job; returns it ``canceled``.

        Raises :class:`Conflict` (``code == "job_finished"``) if it already ended, :class:`NotFound`.
        """
        return job_from(self._send(cancel_spec(job_id_of(job), reason)))

    def wait(self, job: Job | str, timeout_s: float | None = None, *, poll_interval_s: float = 0.25,
             max_poll_interval_s: float = 2.0, on_update: Callable[[Job], None] | None = None) -> Job:
        """Poll until the job ends and return it (whatever way it ended: check ``job.succeeded`` or call
        ``job.raise_for_status()``).

        Polls every ``poll_interval_s``, slowing to ``max_poll_interval_s``; ``on_update`` is called with
        each state read. Raises :class:`WaitTimeout` after ``timeout_s`` (None: no limit).
        """
        job_id = job_id_of(job)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        interval = poll_interval_s
        while True:
            current = self.get(job_id)
            if on_update is not None:
                on_update(current)
            if current.done:
                return current
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"job {job_id} still {current.status} after {timeout_s} s", current)
                self._sleep(min(interval, remaining))
            else:
                self._sleep(interval)
            interval = min(max_poll_interval_s, interval * 1.5)

    def stream(self, job: Job | str, *, max_reconnects: int = 5) -> Iterator[JobEvent]:
        """Live events of a job from ``GET /v1/jobs/{id}/events`` until it ends.

        Yields :class:`StatusEvent` (the full job; first, and on every status change),
        :class:`ProgressEvent` (``step``/``total``), :class:`PreviewEvent` (``url``) and finally
        :class:`DoneEvent` (the final job), then stops. A dropped stream is reopened (the server
        resends the current status first, so nothing is missed), up to ``max_reconnects`` times in
        a row without an event. Raises :class:`NotFound`, :class:`Unauthorized`,
        :class:`APIConnectionError`.
        """
        job_id = job_id_of(job)
        spec = RequestSpec("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
        failures = 0
        parser = SSEParser()
        while True:
            received = False
            try:
                response = self._send(spec, stream=True)
                try:
                    for line in response.iter_lines():
                        frame = parser.feed(line)
                        if frame is None:
                            continue
                        event = decode_sse(frame.event, frame.data)
                        if event is None:
                            continue
                        received, failures = True, 0
                        yield event
                        if isinstance(event, DoneEvent):
                            return
                finally:
                    response.close()
            except httpx.TransportError as exc:
                if failures >= max_reconnects:
                    raise APIConnectionError(f"event stream of {job_id}: {type(exc).__name__}: {exc}") from exc
            except APIConnectionError:
                if failures >= max_reconnects:
                    raise
            if not received:
                failures += 1
                if failures > max_reconnects:
                    raise APIConnectionError(f"event stream of {job_id} keeps closing without events")
            retry_ms, parser = parser.retry_ms, SSEParser()  # a half-read frame is dropped
            parser.retry_ms = retry_ms
            self._sleep(sse_retry_delay(retry_ms, failures))

    # -- outputs -----------------------------------------------------------------------------

    def read_output(self, output: Output, *, verify: bool = True) -> bytes:
        """The bytes of one output from its presigned URL, checked against ``sha256``/``size_bytes``."""
        try:
            response = self._downloads.get(_download_url(output))
        except httpx.TransportError as exc:
            raise APIConnectionError(f"downloading {output.key}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        if verify:
            check_integrity(output, response.content)
        return response.content

    def download(self, target: Job | Output | Sequence[Output], directory: str | Path = ".", *,
                 verify: bool = True) -> builtins.list[Path]:
        """Save outputs into ``directory`` (created if needed) as ``<job id>_<n>.<ext>``; returns the paths.

        ``target`` is a Job (all its outputs), one Output or a list. Each file is checked against its
        ``sha256`` and size (:class:`IntegrityError`) and written atomically. When given a Job whose
        presigned URLs expired, the job is read again for fresh ones.
        """
        outputs, job_id = outputs_of(target)
        folder = Path(directory)
        paths: builtins.list[Path] = []
        for index, output in enumerate(outputs):
            try:
                data = self.read_output(output, verify=verify)
            except APIError as exc:
                if job_id is None or exc.status_code not in (400, 403):
                    raise
                fresh = {o.key: o for o in self.get(job_id).outputs}
                output = fresh.get(output.key, output)
                data = self.read_output(output, verify=verify)
            path = folder / output_filename(output, index)
            write_atomic(path, data)
            paths.append(path)
        return paths


class AsyncClient(_Common):
    """The asyncio version of :class:`Client`: the same constructor and methods, awaited.

    :meth:`list` and :meth:`stream` are async iterators (``async for``).

    >>> async with AsyncClient("http://127.0.0.1:8000", api_key="...") as client:  # doctest: +SKIP
    ...     job = await client.edit("cat.png", "give the cat a red hat")
    ...     async for event in client.stream(job):
    ...         print(event)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_retry_wait_s: float = 60.0,
        upload: UploadMode = "auto",
        stream_read_timeout_s: float = 90.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | str = True,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s=timeout_s, max_retries=max_retries,
                         max_retry_wait_s=max_retry_wait_s, upload=upload,
                         stream_read_timeout_s=stream_read_timeout_s, headers=headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport,
                                       verify=verify)
        self._downloads = httpx.AsyncClient(timeout=timeout_s, transport=transport, verify=verify,
                                            follow_redirects=True)
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def aclose(self) -> None:
        """Close the connection pools."""
        await self._http.aclose()
        await self._downloads.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _send(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            request = spec.build(self._http, self._headers, self._stream_timeout if stream else None)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.delay_for_error(attempt, spec, exc)
                if delay is None:
                    raise APIConnectionError(f"{spec.method} {spec.path}: {type(exc).__name__}: {exc}") from exc
                await self._sleep(delay)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            body = await response.aread()
            await response.aclose()
            delay = self.retry.delay_for_response(attempt, spec, response)
            if delay is None:
                raise error_from_response(response, body)
            await self._sleep(delay)
            attempt += 1

    async def submit(
        self,
        operation: Operation = "edit",
        *,
        model: str | None = None,
        prompt: str | None = None,
        image: ImageInput | None = None,
        images: Sequence[ImageInput] | None = None,
        mask: ImageInput | None = None,
        boxes: Sequence[Box] | None = None,
        outpaint: Mapping[str, int] | None = None,
        move: Mapping[str, Any] | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        true_cfg_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        strength: float | None = None,
        num_images: int | None = None,
        loras: Sequence[Any] | None = None,
        output_format: OutputFormat | None = None,
        output_quality: int | None = None,
        dpi: int | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[WebhookEventName] | None = None,
        priority: Priority | None = None,
        timeout_s: float | None = None,
        queue_deadline_s: float | None = None,
        idempotency_key: str | None = None,
        extra_fields: Mapping[str, Any] | None = None,
    ) -> Job:
        """See :meth:`Client.submit`."""
        fields = submit_fields(
            operation, model=model, prompt=prompt, image=image, images=images, mask=mask, boxes=boxes,
            outpaint=outpaint, move=move, negative_prompt=negative_prompt, seed=seed, steps=steps,
            true_cfg_scale=true_cfg_scale, width=width, height=height, strength=strength,
            num_images=num_images, loras=loras, output_format=output_format, output_quality=output_quality,
            dpi=dpi, webhook=webhook, webhook_events=webhook_events, priority=priority, timeout_s=timeout_s,
            queue_deadline_s=queue_deadline_s, extra_fields=extra_fields)
        spec = build_submit(fields, self.upload, idempotency_key)
        return job_from(await self._send(spec))

    async def edit(self, image: ImageInput, prompt: str, *, images: Sequence[ImageInput] | None = None,
                   boxes: Sequence[Box] | None = None, mask: ImageInput | None = None,
                   **options: Unpack[SubmitOptions]) -> Job:
        """See :meth:`Client.edit`."""
        return await self.submit("edit", image=image, prompt=prompt, images=images, boxes=boxes, mask=mask,
                                 **options)

    async def generate(self, prompt: str, **options: Unpack[SubmitOptions]) -> Job:
        """See :meth:`Client.generate`."""
        return await self.submit("generate", prompt=prompt, **options)

    async def inpaint(self, image: ImageInput, prompt: str, *, mask: ImageInput | None = None,
                      boxes: Sequence[Box] | None = None, **options: Unpack[SubmitOptions]) -> Job:
        """See :meth:`Client.inpaint`."""
        inpaint_check(mask, boxes)
        return await self.submit("inpaint", image=image, prompt=prompt, mask=mask, boxes=boxes, **options)

    async def outpaint(self, image: ImageInput, prompt: str | None = None, *, left: int = 0, right: int = 0,
                       top: int = 0, bottom: int = 0, **options: Unpack[SubmitOptions]) -> Job:
        """See :meth:`Client.outpaint`."""
        return await self.submit("outpaint", image=image, prompt=prompt,
                                 outpaint={"left": left, "right": right, "top": top, "bottom": bottom},
                                 **options)

    async def move(self, image: ImageInput, box: Box, *, dx: float, dy: float, scale: float | None = None,
                   prompt: str | None = None, **options: Unpack[SubmitOptions]) -> Job:
        """See :meth:`Client.move`."""
        spec: dict[str, Any] = {"box": list(box), "dx": dx, "dy": dy}
        if scale is not None:
            spec["scale"] = scale
        return await self.submit("move", image=image, prompt=prompt, move=spec, **options)

    async def upscale(self, image: ImageInput, *, prompt: str | None = None,
                      **options: Unpack[SubmitOptions]) -> Job:
        """See :meth:`Client.upscale`."""
        return await self.submit("upscale", image=image, prompt=prompt, **options)

    async def get(self, job: Job | str) -> Job:
        """See :meth:`Client.get`."""
        return job_from(await self._send(RequestSpec("GET", f"/v1/jobs/{job_id_of(job)}")))

    async def models(self) -> builtins.list[Model]:
        """See :meth:`Client.models`."""
        return models_from(await self._send(RequestSpec("GET", "/v1/models")))

    async def list_page(self, *, status: str | Sequence[str] | None = None, limit: int = 20,
                        cursor: str | None = None) -> JobPage:
        """See :meth:`Client.list_page`."""
        return page_from((await self._send(list_spec(status, limit, cursor))).json())

    async def list(self, *, status: str | Sequence[str] | None = None, page_size: int = 50,
                   max_jobs: int | None = None) -> AsyncIterator[Job]:
        """See :meth:`Client.list` (an async iterator)."""
        cursor: str | None = None
        count = 0
        while True:
            page = await self.list_page(status=status, limit=page_size, cursor=cursor)
            for job in page.jobs:
                if max_jobs is not None and count >= max_jobs:
                    return
                count += 1
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job: Job | str, *, reason: str | None = None) -> Job:
        """See :meth:`Client.cancel`."""
        return job_from(await self._send(cancel_spec(job_id_of(job), reason)))

    async def wait(self, job: Job | str, timeout_s: float | None = None, *, poll_interval_s: float = 0.25,
                   max_poll_interval_s: float = 2.0, on_update: Callable[[Job], Any] | None = None) -> Job:
        """See :meth:`Client.wait` (``on_update`` may be a coroutine function)."""
        job_id = job_id_of(job)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        interval = poll_interval_s
        while True:
            current = await self.get(job_id)
            if on_update is not None:
                result = on_update(current)
                if asyncio.iscoroutine(result):
                    await result
            if current.done:
                return current
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise WaitTimeout(f"job {job_id} still {current.status} after {timeout_s} s", current)
                await self._sleep(min(interval, remaining))
            else:
                await self._sleep(interval)
            interval = min(max_poll_interval_s, interval * 1.5)

    async def stream(self, job: Job | str, *, max_reconnects: int = 5) -> AsyncIterator[JobEvent]:
        """See :meth:`Client.stream` (an async iterator)."""
        job_id = job_id_of(job)
        spec = RequestSpec("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"})
        failures = 0
        parser = SSEParser()
        while True:
            received = False
            try:
                response = await self._send(spec, stream=True)
                try:
                    async for line in response.aiter_lines():
                        frame = parser.feed(line)
                        if frame is None:
                            continue
                        event = decode_sse(frame.event, frame.data)
                        if event is None:
                            continue
                        received, failures = True, 0
                        yield event
                        if isinstance(event, DoneEvent):
                            return
                finally:
                    await response.aclose()
            except httpx.TransportError as exc:
                if failures >= max_reconnects:
                    raise APIConnectionError(f"event stream of {job_id}: {type(exc).__name__}: {exc}") from exc
            except APIConnectionError:
                if failures >= max_reconnects:
                    raise
            if not received:
                failures += 1
                if failures > max_reconnects:
                    raise APIConnectionError(f"event stream of {job_id} keeps closing without events")
            retry_ms, parser = parser.retry_ms, SSEParser()
            parser.retry_ms = retry_ms
            await self._sleep(sse_retry_delay(retry_ms, failures))

    async def read_output(self, output: Output, *, verify: bool = True) -> bytes:
        """See :meth:`Client.read_output`."""
        try:
            response = await self._downloads.get(_download_url(output))
        except httpx.TransportError as exc:
            raise APIConnectionError(f"downloading {output.key}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        if verify:
            check_integrity(output, response.content)
        return response.content

    async def download(self, target: Job | Output | Sequence[Output], directory: str | Path = ".", *,
                       verify: bool = True) -> builtins.list[Path]:
        """See :meth:`Client.download`."""
        outputs, job_id = outputs_of(target)
        folder = Path(directory)
        paths: builtins.list[Path] = []
        for index, output in enumerate(outputs):
            try:
                data = await self.read_output(output, verify=verify)
            except APIError as exc:
                if job_id is None or exc.status_code not in (400, 403):
                    raise
                fresh = {o.key: o for o in (await self.get(job_id)).outputs}
                output = fresh.get(output.key, output)
                data = await self.read_output(output, verify=verify)
            path = folder / output_filename(output, index)
            write_atomic(path, data)
            paths.append(path)
        return paths
