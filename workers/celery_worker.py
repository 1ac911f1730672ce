"""The Celery app of the workers, with their tasks registered: ``celery -A workers.celery_worker``.

Importing this module never touches CUDA or the network (the prefork parent imports it).
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init

from workers import services
from workers.tasks import register

app = services.celery_app()
register(app)

log = logging.getLogger("editfarm.worker")


@worker_process_init.connect
def _load_model_in_child(**_: object) -> None:
    # The child, not the parent, loads the model: CUDA does not survive fork.
    if os.environ.get("EDITFARM_WORKER_ROLE", "render") == "render":
        services.warm_up()
