"""The contract between editfarm's deployables.

Job schema and status enum, Redis key and queue names, the job store (``broker.jobstore``), the
render queues, the webhook outbox's layout, the Celery app and task names, progress events.
Imports nothing else of ours.
"""
