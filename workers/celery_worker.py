"""The Celery app of the workers, with their tasks registered: ``celery -A workers.celery_worker``.

Importing this module never touches CUDA or the network (the prefork parent imports it).
"""

from __future__ import annotations

import logging
import os
import uuid

# diffusers checks CUDA when imported; this makes that check not initialise CUDA, so a
# prefork parent that imports it by accident does not break its forked children.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from celery.signals import (
    celeryd_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)

from workers import services  # noqa: E402 - after the CUDA-check setting above
from workers.tasks import register  # noqa: E402

app = services.celery_app()
register(app)

log = logging.getLogger("editfarm.worker")


def _role() -> str:
    return os.environ.get("EDITFARM_WORKER_ROLE", "render")


@celeryd_init.connect
def _name_the_process(sender: str | None = None, **_: object) -> None:
    # leases, drain keys and heartbeats use the Celery node name (gpu0@host); children inherit it
    # a fresh instance id per start: a restarted worker must not inherit a predecessor's drain deadline
    os.environ["EDITFARM_WORKER_INSTANCE"] = uuid.uuid4().hex[:12]
    if sender and not os.environ.get("EDITFARM_WORKER_NAME"):
        os.environ["EDITFARM_WORKER_NAME"] = sender
        services.settings.cache_clear()


@celeryd_init.connect
def _refuse_a_card_it_cannot_fit(**_: object) -> None:
    # In the parent, before the pool forks: NVML/nvidia-smi only, never CUDA. A profile that
    # cannot run here or does not fit the card exits the worker with the profiles that would fit,
    # instead of an out-of-memory crash loop of render children.
    if _role() == "render":
        from workers.render_setup import exit_if_unfit

        exit_if_unfit(services.settings())


@worker_process_init.connect
def _load_model_in_child(**_: object) -> None:
    # The child, not the parent, loads the model: CUDA does not survive fork.
    if _role() == "render":
        services.warm_up()
        services.start_background("render")


@worker_ready.connect
def _start_cpu_services(**_: object) -> None:
    if _role() == "webhooks":
        services.start_background("webhooks")


@worker_shutting_down.connect
def _drain(**_: object) -> None:
    # SIGTERM (Kubernetes, compose) is Celery's warm shutdown: no new jobs are taken and the
    # running one gets drain_timeout_s before the runner hands it back to the queue.
    if _role() == "render":
        try:
            services.start_drain()
        except Exception:  # noqa: BLE001 - without Redis the lease lapses and the reaper requeues
            log.exception("could not record the drain deadline")


@worker_process_shutdown.connect
def _finish_last_job(**_: object) -> None:
    # A pool child exits after its last task returned, but that job's encode + upload may still be
    # running on the background finisher: let it end (a child killed meanwhile leaves the job's
    # lease to lapse, and the reaper re-sends it).
    if _role() == "render":
        services.pipelining().drain(services.settings().drain_timeout_s)
