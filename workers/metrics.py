"""Prometheus metrics of a worker process, served on ``EDITFARM_METRICS_PORT`` at /metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.jobstore import JobStore
from broker.schema import PRIORITY_ORDER

log = logging.getLogger("editfarm.metrics")

# seconds, up to an hour: renders of big images and queue waits in busy hours take minutes
_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

JOBS = Counter("editfarm_jobs_total", "Jobs that reached a status, counted where it happened", ["status"])
QUEUE_WAIT = Histogram("editfarm_queue_wait_seconds", "Submission to start of render", buckets=_BUCKETS_S)
RENDER = Histogram("editfarm_render_seconds", "Pipeline time per job", buckets=_BUCKETS_S)
UPLOAD = Histogram("editfarm_upload_seconds", "Encode and upload of a job's outputs", buckets=_BUCKETS_S)
WEBHOOKS = Counter("editfarm_webhook_deliveries_total", "Webhook delivery attempts by outcome", ["outcome"])
RECOMPILES = Counter("editfarm_compile_after_warmup_total",
                     "torch.compile compiles after the warm-up (a shape the warm-up did not render)")
RECOMPILE_SECONDS = Counter("editfarm_compile_after_warmup_seconds_total",
                            "Seconds spent compiling after the warm-up (the renders they stalled)")
REPLICA_SHORTFALLS = Counter("editfarm_redis_replica_shortfalls_total",
                             "Job store writes fewer than EDITFARM_REDIS_MIN_REPLICAS replicas acknowledged in time",
                             ["what"])

_HISTOGRAMS = {"queue_wait": QUEUE_WAIT, "render": RENDER, "upload": UPLOAD}


def recompiled(seconds: float) -> None:
    """The compile watch's hook (workers/pipeline/compile_watch.py)."""
    RECOMPILES.inc()
    RECOMPILE_SECONDS.inc(seconds)


def observe(name: str, value: float) -> None:
    """The runner's hook: durations in seconds by name, or ``job.<status>`` counts."""
    if name in _HISTOGRAMS:
        _HISTOGRAMS[name].observe(value)
    elif name.startswith("job."):
        JOBS.labels(status=name.removeprefix("job.")).inc(value)


def replica_shortfall(what: str, acked: int) -> None:
    """The job store's hook (broker/replication.py): a write too few replicas acknowledged."""
    REPLICA_SHORTFALLS.labels(what=what).inc()


class ClusterCollector(Collector):
    """Gauges read at scrape time: queue depth per priority, running jobs, GPU memory."""

    def __init__(self, store: Callable[[], JobStore], gpu_memory: Callable[[], dict[str, int]]) -> None:
        self.store, self.gpu_memory = store, gpu_memory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            store = self.store()
            depth = GaugeMetricFamily("editfarm_queue_depth", "Jobs waiting, by priority", labels=["priority"])
            for priority in PRIORITY_ORDER:
                depth.add_metric([priority.value], store.queued_count(priority))
            yield depth
            yield GaugeMetricFamily("editfarm_jobs_running", "Jobs running now", value=store.running_count())
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
            log.warning("queue metrics unavailable")
        memory = GaugeMetricFamily("editfarm_gpu_memory_bytes", "GPU memory allocated by this process",
                                   labels=["device"])
        for device, used in self.gpu_memory().items():
            memory.add_metric([device], used)
        yield memory


_served = False


def serve(port: int, store: Callable[[], JobStore], gpu_memory: Callable[[], dict[str, int]]) -> None:
    """Start the /metrics HTTP server once per process (port 0: off)."""
    global _served
    if _served or port <= 0:
        return
    REGISTRY.register(ClusterCollector(store, gpu_memory))
    start_http_server(port, addr="0.0.0.0")
    _served = True
    log.info("metrics on :%d/metrics", port)
