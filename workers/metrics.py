"""Prometheus metrics of a worker process, served on ``EDITFARM_METRICS_PORT`` at /metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.jobstore import JobStore
from broker.schema import PRIORITY_ORDER

log = logging.getLogger("editfarm.metrics")

# seconds, up to an hour: renders of big images and queue waits in busy hours take minutes
_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

# ``model``: the model a render worker serves (set_model); a webhook worker's counts (the reaper's
# transitions) carry model="" (it serves none)
JOBS = Counter("editfarm_jobs_total", "Jobs that reached a status, counted where it happened", ["status", "model"])
QUEUE_WAIT = Histogram("editfarm_queue_wait_seconds", "Submission to start of render", ["model"],
                       buckets=_BUCKETS_S)
RENDER = Histogram("editfarm_render_seconds", "Pipeline time per job", ["model"], buckets=_BUCKETS_S)
UPLOAD = Histogram("editfarm_upload_seconds", "Encode and upload of a job's outputs", ["model"], buckets=_BUCKETS_S)
WEBHOOKS = Counter("editfarm_webhook_deliveries_total", "Webhook delivery attempts by outcome", ["outcome"])
RECOMPILES = Counter("editfarm_compile_after_warmup_total",
                     "torch.compile compiles after the warm-up (a shape the warm-up did not render)")
RECOMPILE_SECONDS = Counter("editfarm_compile_after_warmup_seconds_total",
                            "Seconds spent compiling after the warm-up (the renders they stalled)")
REPLICA_SHORTFALLS = Counter("editfarm_redis_replica_shortfalls_total",
                             "Job store writes fewer than EDITFARM_REDIS_MIN_REPLICAS replicas acknowledged in time",
                             ["what"])

MODEL_INFO = Gauge("editfarm_model_info", "The model this render worker serves and what it loaded: its "
                   "pipeline class and a fingerprint of its weights (1 while loaded)", ["model", "pipeline", "weights"])

_HISTOGRAMS = {"queue_wait": QUEUE_WAIT, "render": RENDER, "upload": UPLOAD}


_model = ""


def set_model(name: str) -> None:
    """The model this process renders: the ``model`` label of its job metrics (a render worker serves one)."""
    global _model
    _model = name


def model_loaded(model: str, identity: dict[str, str]) -> None:
    """A render worker's model is loaded: ``identity`` is the renderer's (pipeline, weights)."""
    MODEL_INFO.labels(model=model, pipeline=identity.get("pipeline", ""), weights=identity.get("weights", "")).set(1)


def recompiled(seconds: float) -> None:
    """The compile watch's hook (workers/pipeline/compile_watch.py)."""
    RECOMPILES.inc()
    RECOMPILE_SECONDS.inc(seconds)


def observe(name: str, value: float) -> None:
    """The runner's hook: durations in seconds by name, or ``job.<status>`` counts."""
    if name in _HISTOGRAMS:
        _HISTOGRAMS[name].labels(model=_model).observe(value)
    elif name.startswith("job."):
        JOBS.labels(status=name.removeprefix("job."), model=_model).inc(value)


def replica_shortfall(what: str, acked: int) -> None:
    """The job store's hook (broker/replication.py): a write too few replicas acknowledged."""
    REPLICA_SHORTFALLS.labels(what=what).inc()


class ClusterCollector(Collector):
    """Gauges read at scrape time: queue depth per model and priority, running jobs per model (``models``:
    a render worker's own, a webhook worker's catalog), GPU memory."""

    def __init__(self, store: Callable[[], JobStore], gpu_memory: Callable[[], dict[str, int]],
                 models: Sequence[str]) -> None:
        self.store, self.gpu_memory, self.models = store, gpu_memory, tuple(models)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            store = self.store()
            depth = GaugeMetricFamily("editfarm_queue_depth", "Jobs waiting, by model and priority",
                                      labels=["model", "priority"])
            running = GaugeMetricFamily("editfarm_jobs_running", "Jobs running now, by model", labels=["model"])
            for model in self.models:
                for priority in PRIORITY_ORDER:
                    depth.add_metric([model, priority.value], store.queued_count(priority, model))
                running.add_metric([model], store.running_count(model))
            yield depth
            yield running
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
            log.warning("queue metrics unavailable")
        memory = GaugeMetricFamily("editfarm_gpu_memory_bytes", "GPU memory allocated by this process",
                                   labels=["device"])
        for device, used in self.gpu_memory().items():
            memory.add_metric([device], used)
        yield memory


_served = False


def serve(port: int, store: Callable[[], JobStore], gpu_memory: Callable[[], dict[str, int]],
          models: Sequence[str]) -> None:
    """Start the /metrics HTTP server once per process (port 0: off)."""
    global _served
    if _served or port <= 0:
        return
    REGISTRY.register(ClusterCollector(store, gpu_memory, models))
    start_http_server(port, addr="0.0.0.0")
    _served = True
    log.info("metrics on :%d/metrics", port)
