"""Prometheus metrics of the API process, served unauthenticated at ``GET /metrics``.

``/metrics`` is meant for the cluster network (a Prometheus scraper or a
ServiceMonitor); keep it off the public ingress. It reveals counts only: no
job ids, tenants or prompts.

Each app has its own :class:`prometheus_client.CollectorRegistry`, so apps built
by tests never share counters. Families:

- ``editfarm_http_requests_total{route,method,status}``: ``route`` is the route
  template (``/v1/jobs/{job_id}``), never the raw path; unmatched paths are
  ``route="unmatched"``.
- ``editfarm_http_request_duration_seconds{route,method}``: latency histogram
  (event streams are left out: their duration is how long a client watched).
- ``editfarm_jobs_total{status="submitted"|"canceled",model}``: counted by the API.
- ``editfarm_queue_depth{model,priority}`` and ``editfarm_jobs_running{model}``: read
  from the job store at scrape time for every model of the catalog; left out of a
  scrape when the store does not answer within ``metrics_store_timeout_s``
  (``editfarm_job_store_up`` is then 0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import internal_error
from broker.jobstore import JobStore
from broker.keys import LEGACY_MODEL
from broker.schema import PRIORITY_ORDER

logger = logging.getLogger("editfarm.api")

UNMATCHED = "unmatched"


class StoreCollector(Collector):
    """Queue depth per model and priority and running jobs per model, read from the job store at each
    scrape (``models``: the catalog's names).

    The reads run on a helper thread given ``timeout_s``: a Redis client that
    retries a dead server with backoff must not hold a scrape past Prometheus'
    own timeout. While an earlier read is still stuck, scrapes skip the store.
    """

    def __init__(self, store: Callable[[], JobStore], timeout_s: float = 2.0,
                 models: Callable[[], Sequence[str]] = lambda: (LEGACY_MODEL,)) -> None:
        self._store = store
        self._models = models
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def _read(self, result: dict[str, Any]) -> None:
        try:
            store = self._store()
            models = tuple(self._models())
            result["depths"] = [(m, p.value, store.queued_count(p, m)) for m in models for p in PRIORITY_ORDER]
            result["running"] = [(m, store.running_count(m)) for m in models]
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis is down
            result["error"] = type(exc).__name__

    def _read_store(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        with self._lock:
            if self._reader is not None and self._reader.is_alive():
                return {"error": "an earlier read is still waiting"}
            reader = self._reader = threading.Thread(target=self._read, args=(result,),
                                                     name="metrics-store-read", daemon=True)
            reader.start()
        reader.join(self._timeout_s)
        if reader.is_alive():
            return {"error": f"no answer within {self._timeout_s}s"}
        return result

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("editfarm_job_store_up", "1 if the job store answered this scrape, else 0")
        result = self._read_store()
        if "error" in result:
            logger.warning("metrics: job store unavailable: %s", result["error"])
            up.add_metric([], 0)
            yield up
            return
        depths, running = result["depths"], result["running"]
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("editfarm_queue_depth", "Jobs queued, per model and priority",
                                  labels=["model", "priority"])
        for model, priority, count in depths:
            depth.add_metric([model, priority], count)
        yield depth
        gauge = GaugeMetricFamily("editfarm_jobs_running", "Jobs running now, per model", labels=["model"])
        for model, count in running:
            gauge.add_metric([model], count)
        yield gauge


class ApiMetrics:
    """The metrics of one app, in their own registry."""

    def __init__(self, store: Callable[[], JobStore], store_timeout_s: float = 2.0,
                 models: Callable[[], Sequence[str]] = lambda: (LEGACY_MODEL,)) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "editfarm_http_requests", "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.http_latency = Histogram(
            "editfarm_http_request_duration_seconds", "Time to answer an HTTP request (event streams excluded)",
            ["route", "method"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.jobs = Counter("editfarm_jobs", "Jobs submitted and canceled through the API", ["status", "model"],
                            registry=self.registry)
        for model in models():
            for status in ("submitted", "canceled"):
                self.jobs.labels(status=status, model=model)  # present (at 0) before the first job
        self.registry.register(StoreCollector(store, store_timeout_s, models))

    def job_submitted(self, model: str) -> None:
        self.jobs.labels(status="submitted", model=model).inc()

    def job_canceled(self, model: str) -> None:
        self.jobs.labels(status="canceled", model=model).inc()


def route_template(scope: Scope) -> str:
    """The matched route's path template, or ``unmatched`` (raw paths would explode label cardinality)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class MetricsMiddleware:
    """Counts every HTTP request and observes its latency, by route template; and answers an
    unexpected exception with 500 ``internal_error`` (:func:`api.errors.internal_error`; logged, never
    echoed; re-raised if the response had started), counted as such. One pure ASGI layer for both:
    each layer costs every request a wrapped ``send`` and a frame per message."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = streaming = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, started, streaming
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await internal_error().response()(scope, receive, tracking_send)
        finally:
            route, method = route_template(scope), str(scope.get("method", ""))
            self._counter(route, method, status).inc()
            if not streaming:
                self._histogram(route, method).observe(time.perf_counter() - start)

    # the labelled children, looked up once each: .labels() hashes its labels and takes a lock on every
    # call, on every request. Bounded: routes are templates (or "unmatched"), and methods and statuses
    # are few.
    def _counter(self, route: str, method: str, status: int) -> Any:
        key = (route, method, status)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self.metrics.http_requests.labels(route=route, method=method,
                                                                            status=str(status))
        return child

    def _histogram(self, route: str, method: str) -> Any:
        key = (route, method)
        child = self._histograms.get(key)
        if child is None:
            child = self._histograms[key] = self.metrics.http_latency.labels(route=route, method=method)
        return child
