"""The baseline of ``bench.orchestration``: a bare Celery app with one no-op task and a Redis
result backend, on the same Redis as the cluster, configured like the render queue
(acks_late, prefetch 1, prefork with one child):

    celery -A bench.noop_celery:app worker -Q bench.noop -P prefork -c 1

``EDITFARM_BENCH_REDIS_URL`` names the Redis (broker and result backend).
"""

from __future__ import annotations

import os

from celery import Celery

QUEUE = "bench.noop"
url = os.environ.get("EDITFARM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench-noop", broker=url, backend=url, set_as_current=False)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue=QUEUE,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="bench.noop")
def noop(value: int) -> int:
    return value
