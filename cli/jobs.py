"""`editfarm submit` and `editfarm jobs …`: the job API from a terminal, built on the Python SDK.

Exit codes tell outcomes apart for scripts: 0 succeeded (or the command did what it was
asked), 1 the job failed or was canceled, 2 bad input (usage errors and API 4xx), 3 the API
could not be reached or answered 5xx, 4 gave up waiting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4

jobs_app = typer.Typer(help="List, inspect, cancel and watch jobs.", no_args_is_help=True)

ApiUrl = typer.Option("http://127.0.0.1:8000", "--api-url", envvar="EDITFARM_API_URL")
ApiKey = typer.Option(..., "--api-key", envvar="EDITFARM_API_KEY")
AsJson = typer.Option(False, "--json", help="print machine-readable JSON")


def client_for(api_url: str, api_key: str) -> Any:
    from editfarm_client import Client

    return Client(api_url, api_key=api_key)


def fail(exc: Exception, as_json: bool) -> typer.Exit:
    """Report an SDK error and map it to the exit code for its kind."""
    from editfarm_client import APIConnectionError, APIError, WaitTimeout

    code = getattr(exc, "code", "error")
    if isinstance(exc, APIError):
        status = exc.status_code
        exit_code = EXIT_BAD_INPUT if 400 <= status < 500 and status not in (429,) else EXIT_UNAVAILABLE
    elif isinstance(exc, APIConnectionError):
        exit_code = EXIT_UNAVAILABLE
    elif isinstance(exc, WaitTimeout):
        exit_code = EXIT_TIMEOUT
    else:
        exit_code = EXIT_UNAVAILABLE
    message = getattr(exc, "message", str(exc))
    if as_json:
        typer.echo(json.dumps({"error": {"code": code, "message": message,
                                         "param": getattr(exc, "param", None)}}))
    else:
        param = getattr(exc, "param", None)
        typer.echo(f"error: {code}: {message}" + (f" (param: {param})" if param else ""), err=True)
    return typer.Exit(exit_code)


def _job_dict(job: Any) -> dict[str, Any]:
    raw = getattr(job, "raw", None)
    if isinstance(raw, dict):
        return raw
    import dataclasses

    return dataclasses.asdict(job)


def _on_model(job: Any) -> str:
    """`` on model NAME`` for a job that names one (a server without models names none)."""
    model = getattr(job, "model", None)
    return f" on model {model}" if model else ""


def _floats(text: str, count: int, what: str) -> list[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != count:
        raise typer.BadParameter(f"{what} takes {count} comma-separated numbers, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(f"{what}: {text!r} is not a list of numbers") from None


def _lora(text: str) -> dict[str, Any]:
    """``URI`` or ``URI:scale`` (the scale is the part after the last colon, if it is a number)."""
    uri, sep, scale = text.rpartition(":")
    if sep:
        try:
            return {"uri": uri, "scale": float(scale)}
        except ValueError:
            pass
    return {"uri": text, "scale": 1.0}


def follow(client: Any, job: Any) -> Any:
    """A live progress bar from the job's event stream; returns the final job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    final = job
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(job.status, total=None)
        for event in client.stream(job):
            if event.kind == "progress":
                bar.update(task, description="running", completed=event.step, total=event.total)
            elif event.kind == "status":
                bar.update(task, description=event.job.status)
            elif event.kind == "done":
                final = event.job
                bar.update(task, description=final.status)
    return final


def submit(
    image: Path | None = typer.Argument(None, help="input image (all operations but generate)"),
    prompt: str | None = typer.Option(None, "--prompt", "-p"),
    operation: str = typer.Option("edit", "--op", help="edit|generate|inpaint|outpaint|move|upscale"),
    model: str | None = typer.Option(None, "--model", help="the model to render with (`editfarm models list`); "
                                                          "default: the catalog's default for the operation"),
    ref: list[Path] = typer.Option([], "--ref", help="reference image for edit (repeat, up to 3)"),
    mask: Path | None = typer.Option(None, "--mask", help="inpaint mask (white = repaint)"),
    box: list[str] = typer.Option([], "--box", help="x0,y0,x1,y1 relative 0..1 (repeat)"),
    outpaint: str | None = typer.Option(None, "--outpaint", help="left,top,right,bottom pixels to add"),
    move: str | None = typer.Option(None, "--move", help="x0,y0,x1,y1:dx,dy[,scale] (box relative, dx/dy px)"),
    upscale: float | None = typer.Option(None, "--upscale", help="upscale factor"),
    lora: list[str] = typer.Option([], "--lora", help="URI[:scale] (repeat)"),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt"),
    seed: int | None = None, steps: int | None = None,
    cfg: float | None = typer.Option(None, "--cfg", help="true_cfg_scale"),
    width: int | None = None, height: int | None = None, strength: float | None = None,
    num_images: int | None = None,
    output_format: str | None = typer.Option(None, "--format"),
    quality: int | None = None, dpi: int | None = None,
    priority: str | None = None, timeout_s: float | None = None,
    webhook: str | None = None,
    wait: bool = typer.Option(True, help="wait for the job and save its outputs"),
    out: Path = typer.Option(Path("out"), help="where outputs are saved"),
    api_url: str = ApiUrl, api_key: str = ApiKey, as_json: bool = AsJson,
) -> None:
    """Submit a job for any operation, follow it with a live progress bar, save the outputs."""
    from editfarm_client import EditfarmError

    fields: dict[str, Any] = {
        "model": model, "prompt": prompt, "image": image, "images": list(ref) or None, "mask": mask,
        "boxes": [_floats(b, 4, "--box") for b in box] or None,
        "negative_prompt": negative_prompt, "seed": seed, "steps": steps, "true_cfg_scale": cfg,
        "width": width, "height": height, "strength": strength, "num_images": num_images,
        "loras": [_lora(x) for x in lora] or None, "output_format": output_format,
        "output_quality": quality, "dpi": dpi, "webhook": webhook, "priority": priority, "timeout_s": timeout_s,
    }
    if outpaint:
        left, top, right, bottom = (int(v) for v in _floats(outpaint, 4, "--outpaint"))
        fields["outpaint"] = {"left": left, "top": top, "right": right, "bottom": bottom}
    if move:
        box_text, _, delta = move.partition(":")
        parts = [p for p in delta.split(",") if p.strip()]
        if len(parts) not in (2, 3):
            raise typer.BadParameter("--move takes x0,y0,x1,y1:dx,dy[,scale]")
        nums = _floats(delta, len(parts), "--move offsets")
        spec: dict[str, Any] = {"box": _floats(box_text, 4, "--move box"), "dx": nums[0], "dy": nums[1]}
        if len(nums) == 3:
            spec["scale"] = nums[2]
        fields["move"] = spec
    extra = {"upscale": {"scale": upscale}} if upscale else None
    client = client_for(api_url, api_key)
    try:
        job = client.submit(operation, extra_fields=extra, **{k: v for k, v in fields.items() if v is not None})
        if not as_json:
            typer.echo(f"job {job.id} {job.status}{_on_model(job)}", err=True)
        if not wait:
            typer.echo(json.dumps(_job_dict(job)) if as_json else job.id)
            return
        job = client.wait(job) if as_json else follow(client, job)
        paths = client.download(job, out) if job.status == "succeeded" else []
    except EditfarmError as exc:
        raise fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps({**_job_dict(job), "saved": [str(p) for p in paths]}))
    else:
        for path in paths:
            typer.echo(f"saved {path}")
        if job.status != "succeeded":
            typer.echo(f"job {job.status}: {job.error.code if job.error else ''} "
                       f"{job.error.message if job.error else ''}", err=True)
    raise typer.Exit(EXIT_OK if job.status == "succeeded" else EXIT_JOB_FAILED)


@jobs_app.command("list")
def list_jobs(status: str | None = None, limit: int = 20, api_url: str = ApiUrl, api_key: str = ApiKey,
              as_json: bool = AsJson) -> None:
    """The tenant's jobs, newest first."""
    from editfarm_client import EditfarmError

    try:
        page = client_for(api_url, api_key).list_page(status=status, limit=limit)
    except EditfarmError as exc:
        raise fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps({"data": [_job_dict(j) for j in page.jobs], "next_cursor": page.next_cursor}))
        return
    width = max((len(job.model or "") for job in page.jobs), default=0)
    for job in page.jobs:
        progress = f"{job.progress.step}/{job.progress.total}" if job.progress else ""
        typer.echo(f"{job.id}  {job.status:<9}  {job.model or '':<{width}}  {progress:>7}  {job.created_at}")


@jobs_app.command("get")
def get_job(job_id: str, api_url: str = ApiUrl, api_key: str = ApiKey, as_json: bool = AsJson) -> None:
    """One job."""
    from editfarm_client import EditfarmError

    try:
        job = client_for(api_url, api_key).get(job_id)
    except EditfarmError as exc:
        raise fail(exc, as_json) from None
    typer.echo(json.dumps(_job_dict(job), indent=None if as_json else 2))


@jobs_app.command("cancel")
def cancel_job(job_id: str, reason: str | None = None, api_url: str = ApiUrl, api_key: str = ApiKey,
               as_json: bool = AsJson) -> None:
    """Cancel a queued or running job (exit 2 if it had already finished)."""
    from editfarm_client import EditfarmError

    try:
        job = client_for(api_url, api_key).cancel(job_id, reason=reason)
    except EditfarmError as exc:
        raise fail(exc, as_json) from None
    typer.echo(json.dumps(_job_dict(job)) if as_json else f"job {job.id} {job.status}{_on_model(job)}")


@jobs_app.command("watch")
def watch_job(job_id: str, api_url: str = ApiUrl, api_key: str = ApiKey, as_json: bool = AsJson) -> None:
    """Follow a job live until it ends (events as JSON lines with --json)."""
    from editfarm_client import EditfarmError

    client = client_for(api_url, api_key)
    try:
        if as_json:
            final = None
            for event in client.stream(job_id):
                payload = {"event": event.kind}
                if event.kind in ("status", "done"):
                    payload["job"] = _job_dict(event.job)
                    final = event.job
                elif event.kind == "progress":
                    payload.update(step=event.step, total=event.total)
                elif event.kind == "preview":
                    payload.update(step=event.step, url=event.url)
                sys.stdout.write(json.dumps(payload) + "\n")
                sys.stdout.flush()
        else:
            final = follow(client, client.get(job_id))
            typer.echo(f"job {final.id} {final.status}{_on_model(final)}")
    except EditfarmError as exc:
        raise fail(exc, as_json) from None
    raise typer.Exit(EXIT_OK if final is not None and final.status == "succeeded" else EXIT_JOB_FAILED)
