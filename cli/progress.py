"""A live progress bar for a job, driven by polling its record."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.client import JobsClient


def follow(client: JobsClient, job_id: str, timeout_s: float = 3600) -> dict[str, Any]:
    """Show the job's status and denoising steps until it ends; returns the final job."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("queued", total=None)

        def update(job: dict[str, Any]) -> None:
            progress = job.get("progress") or {}
            bar.update(task, description=job["status"], completed=progress.get("step", 0),
                       total=progress.get("total") or None)
        return client.wait(job_id, timeout_s=timeout_s, on_update=update)
