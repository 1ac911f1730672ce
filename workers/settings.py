"""Settings of the worker deployable (render and webhook workers), from ``EDITFARM_`` variables."""

from __future__ import annotations

import json
import socket
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from broker.settings import ClusterSettings


class WorkerSettings(ClusterSettings):
    # "diffusers" (the model) or "standin" (no model; tests and benchmarks only, see workers/standin.py)
    renderer: str = "diffusers"
    # the catalog's model this render worker serves (`editfarm worker --model`; workers/serving.py);
    # empty: the catalog's only model
    worker_model: str = ""
    standin_render_s: float = 0.0
    # torch.compile the transformer's repeated blocks at load (GPU; warm-up pays the compile)
    compile_transformer: bool = False
    # memory profile (workers/pipeline/profiles.py), e.g. "fp8-storage+offload-text-encoder"; checked
    # against the card's free memory before the model loads (workers/fitcheck.py) unless fit_check is off
    profile: str = "bf16"
    fit_check: bool = True
    # fast preset (workers/pipeline/presets.py): LoRAs fused at load ("PATH[:SCALE],..."), the scheduler
    # config overrides they need (JSON object), a block cache (off, first-block, taylorseer) and its
    # threshold, the sizes the warm-up renders ("1024x1024,768x1344": what a compiled model serves)
    fuse_loras: str = ""
    scheduler_overrides: str = ""
    block_cache: str = "off"
    block_cache_threshold: float = 0.05
    warmup_sizes: str = ""
    # "cpu", "cuda" or "auto" (cuda when available; only ever evaluated in the child process).
    device: str = "auto"
    # Name of this worker process in leases and logs; Celery's node name is used when empty.
    worker_name: str = ""
    # A running job's lease: renewed every heartbeat; another worker may take the job over
    # only after the lease has lapsed, so a live run is never duplicated.
    lease_s: float = 60.0
    heartbeat_interval_s: float = 10.0
    # A job whose worker died this many times is failed instead of retried forever.
    max_attempts: int = 3
    # Delay before retrying a job whose storage was unreachable (seconds).
    transient_retry_s: float = 5.0
    # written once the model is loaded and warmed up (readiness probe: `editfarm probe ready`)
    ready_file: str = "/tmp/editfarm/ready"
    # touched every heartbeat_interval_s while the process is healthy (liveness: `editfarm probe live`)
    heartbeat_file: str = "/tmp/editfarm/heartbeat"
    # Prometheus /metrics port of this process; 0 turns it off
    metrics_port: int = 0
    # a step's progress (and the cancel check that goes with it) is written at most this often (seconds)
    progress_interval_s: float = 0.1
    # a small preview image (JPEG, from the latents) every this many denoising steps; 0: none
    preview_every_n_steps: int = 0
    # after SIGTERM, a running job may finish for this long before it is handed back (seconds)
    drain_timeout_s: float = 600.0
    # Keep the device busy between jobs (workers/pipelining.py): a render task returns once its render has
    # started, so the next job is taken, leased and its inputs fetched while this one renders ...
    render_lane: bool = True
    # ... once the render is within this long of its end (seconds; estimated from its steps so far)
    lane_lead_s: float = 1.0
    # ... and a rendered job's encode + upload + terminal transition run on a background thread while
    # the next job renders (both under the job's lease)
    finish_in_background: bool = True
    # strict priority: when the device frees, a job the lane took early waits up to this long for a
    # higher-priority job that is queued but whose message a worker holds (workers/priority.py)
    give_way_wait_s: float = 2.0
    # rendering on the CPU: keep freed memory for the next step instead of giving it back to the kernel
    # and page-faulting it in again (workers/malloc.py; ~10 % faster CPU renders, RSS stays at its peak)
    reuse_cpu_memory: bool = True
    # how often the reaper (in webhook workers) looks for lapsed leases and queue deadlines (seconds)
    reaper_interval_s: float = 2.0
    # a queued job whose render message is nowhere (not in its model's lists, held by no worker) this long
    # gets a new one from the reaper: a message lost with a Redis primary that died (workers/reaper.py)
    stranded_after_s: float = Field(default=300.0, gt=0)
    # how often the retention sweeper (in webhook workers) deletes finished jobs past their retention
    retention_sweep_interval_s: float = 10.0
    # for an object store without lifecycle rules: the webhook workers delete a finished job's objects
    # (inputs, previews, outputs, archived record) EDITFARM_OBJECT_RETENTION_DAYS after it ended,
    # instead of the bucket rule of `editfarm storage lifecycle apply` (workers/object_sweeper.py)
    object_sweeper: bool = False
    # how often that sweeper passes over the bucket (seconds)
    object_sweep_interval_s: float = Field(default=600.0, gt=0)

    # a pending webhook message that no delivery has held for this long (and has no retry scheduled
    # sooner) is given a delivery again by the webhook workers' relay (workers/relay.py)
    webhook_relay_after_s: float = 60.0
    webhook_timeout_s: float = 15.0
    # delays before each attempt (s); "0,5,300" or a JSON list in the environment
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = [0, 5, 300, 1800, 7200, 18000, 36000]
    webhook_allow_private: bool = False
    webhook_allow_http: bool = False

    @field_validator("webhook_retry_schedule_s", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        # accept "0,5,300" from the environment as well as a JSON list
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [float(v) for v in text.split(",") if v.strip()]
        return value

    def process_name(self) -> str:
        return self.worker_name or f"worker@{socket.gethostname()}"
