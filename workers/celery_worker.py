"""The Celery app of the workers, with their tasks registered: ``celery -A workers.celery_worker``.

Importing this module never touches CUDA or the network (the prefork parent imports it). Each
process builds its one :class:`~workers.services.WorkerServices` at its start and the tasks get
it from :func:`current_services`: a render worker's pool child after fork (it loads the model),
a webhook worker's main process (its ``threads`` pool runs the tasks; a prefork child of one
builds its own).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid

# diffusers checks CUDA when imported; this makes that check not initialise CUDA, so a
# prefork parent that imports it by accident does not break its forked children.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from celery.signals import (  # noqa: E402
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)

from workers.services import (  # noqa: E402 - after the CUDA-check setting above
    WorkerServices,
    connect_redis,
    drain_of,
    worker_celery,
)
from workers.settings import WorkerSettings  # noqa: E402
from workers.tasks import register  # noqa: E402

log = logging.getLogger("editfarm.worker")

app = worker_celery(WorkerSettings())

# pid → that process's services: a forked child never uses its parent's (connections, threads)
_services: dict[int, WorkerServices] = {}
_building = threading.Lock()


def _role() -> str:
    return os.environ.get("EDITFARM_WORKER_ROLE", "render")


def build_services(settings: WorkerSettings, role: str) -> WorkerServices:
    """This process's services for ``role`` (benchmarks replace this to bring their own renderer)."""
    if role == "render":
        return WorkerServices.for_render(settings, celery=app)
    return WorkerServices.connect(settings, celery=app)


def current_services() -> WorkerServices:
    """This process's services; built here on first use if the process start did not (a pool
    that sends no process-start signal, e.g. ``solo``)."""
    services = _services.get(os.getpid())
    if services is None:
        with _building:
            services = _services.get(os.getpid())
            if services is None:
                services = _services[os.getpid()] = build_services(WorkerSettings(), _role())
    return services


register(app, current_services)


def _start_process(**_: object) -> WorkerServices:
    with _building:
        services = _services[os.getpid()] = build_services(WorkerSettings(), _role())
    return services


@celeryd_init.connect
def _name_the_process(sender: str | None = None, **_: object) -> None:
    # leases, drain keys and heartbeats use the Celery node name (gpu0@host); children inherit it
    # a fresh instance id per start: a restarted worker must not inherit a predecessor's drain deadline
    os.environ["EDITFARM_WORKER_INSTANCE"] = uuid.uuid4().hex[:12]
    if sender and not os.environ.get("EDITFARM_WORKER_NAME"):
        os.environ["EDITFARM_WORKER_NAME"] = sender


@worker_init.connect
def _build_in_main(**_: object) -> None:
    # A webhook worker's main process runs the reaper and heartbeat (and, with the threads pool,
    # the tasks). A render worker's main process builds nothing: the model loads in its child.
    if _role() == "webhooks":
        _start_process()


@celeryd_init.connect
def _refuse_a_card_it_cannot_fit(**_: object) -> None:
    # In the parent, before the pool forks: NVML/nvidia-smi only, never CUDA. A profile that
    # cannot run here or does not fit the card exits the worker with the profiles that would fit,
    # instead of an out-of-memory crash loop of render children.
    if _role() == "render":
        from workers.render_setup import exit_if_unfit
        from workers.serving import served_model

        settings = WorkerSettings()
        # the estimate is of the model this worker serves (its class, profile and largest side)
        exit_if_unfit(settings, served_model(settings).spec)


@worker_process_init.connect
def _build_in_child(**_: object) -> None:
    # The child, not the parent, loads the model: CUDA does not survive fork.
    services = _start_process()
    if _role() == "render":
        services.warm_up()
        services.start_background("render")


@worker_ready.connect
def _start_cpu_services(**_: object) -> None:
    if _role() == "webhooks":
        current_services().start_background("webhooks")


@worker_shutting_down.connect
def _drain(**_: object) -> None:
    # SIGTERM (Kubernetes, compose) is Celery's warm shutdown: no new jobs are taken and the
    # running one gets drain_timeout_s before the runner hands it back to the queue. The main
    # process has no services of its own: a Redis client for this one write.
    if _role() == "render":
        try:
            settings = WorkerSettings()
            drain_of(settings, connect_redis(settings)).start()
        except Exception:  # noqa: BLE001 - without Redis the lease lapses and the reaper requeues
            log.exception("could not record the drain deadline")


@worker_process_shutdown.connect
def _finish_last_job(**_: object) -> None:
    # A pool child exits after its last task returned, but that job's encode + upload may still be
    # running on the background finisher: let it end (a child killed meanwhile leaves the job's
    # lease to lapse, and the reaper re-sends it).
    services = _services.get(os.getpid())
    if services is not None and services.pipelining is not None:
        services.pipelining.drain(services.settings.drain_timeout_s)
    if services is not None:
        services.leave_fleet()
