"""The contract between editfarm's deployables.

Job schema and status enum, Redis key names, the job store, the Celery app and
task names, progress events. Imports nothing else of ours.
"""
