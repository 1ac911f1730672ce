"""`editfarm`: run the API, the workers, a whole local cluster, submit jobs, build the tiny model."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="editfarm: a render farm for Qwen-Image-Edit pipelines.", no_args_is_help=True)
model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@app.command()
def api(host: str = "0.0.0.0", port: int = 8000, workers: int = 1) -> None:
    """Run the submission API (uvicorn)."""
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers)


@app.command()
def worker(
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    queues: str = typer.Option("render", help="render (GPU jobs) or webhooks (CPU deliveries)"),
    concurrency: int = typer.Option(0, help="processes (render: 1 per GPU) or threads (webhooks)"),
    name: str = typer.Option("", help="Celery node name, e.g. gpu0@%h"),
) -> None:
    """Run a Celery worker: render jobs (one process, model loaded in the child) or webhook deliveries."""
    os.environ["EDITFARM_DEVICE"] = device
    role = "webhooks" if queues == "webhooks" else "render"
    os.environ["EDITFARM_WORKER_ROLE"] = role
    from workers.celery_worker import app as celery_app

    argv = ["worker", "-Q", queues, "-E", "--without-gossip", "--without-mingle", "-l", "INFO"]
    if role == "render":
        argv += ["-P", "prefork", "-c", str(concurrency or 1), "-n", name or "render@%h"]
    else:
        argv += ["-P", "threads", "-c", str(concurrency or 8), "-n", name or "webhooks@%h"]
    celery_app.worker_main(argv)


@app.command()
def dev(workdir: Path = Path(".editfarm"), port: int = 8000) -> None:
    """A whole local cluster in one foreground command; Ctrl-C stops it all."""
    from cli.cluster import ClusterConfig, LocalCluster

    config = ClusterConfig(workdir=workdir.resolve(), redis_url=os.environ.get("EDITFARM_REDIS_URL"),
                           model=os.environ.get("EDITFARM_MODEL"), api_port=port,
                           api_keys=os.environ.get("EDITFARM_API_KEYS", ""),
                           webhook_secret=os.environ.get("EDITFARM_WEBHOOK_SECRET", ""))
    typer.echo("starting local cluster…")
    with LocalCluster(config) as cluster:
        typer.echo(f"API      {cluster.api_url}   (docs: {cluster.api_url}/docs)")
        typer.echo(f"API key  {cluster.api_key()}")
        typer.echo(f"Redis    {cluster.redis_url}")
        typer.echo(f"S3       {cluster.s3_url}  bucket editfarm")
        typer.echo(f"logs     {cluster.workdir / 'logs'}")
        typer.echo("Ctrl-C to stop")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            typer.echo("stopping…")


@app.command()
def demo(workdir: Path = Path(".editfarm/demo"), out: Path = Path("out")) -> None:
    """Start a local cluster, edit the sample image, verify the signed webhook, save the output."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(workdir.resolve(), out.resolve()))


@app.command()
def submit(
    image: Path = typer.Argument(..., exists=True, dir_okay=False),
    prompt: str = typer.Option(..., "--prompt", "-p"),
    api_url: str = typer.Option("http://127.0.0.1:8000", envvar="EDITFARM_API_URL"),
    api_key: str = typer.Option(..., envvar="EDITFARM_API_KEY"),
    seed: Optional[int] = None,
    steps: int = 30,
    true_cfg_scale: float = 4.0,
    output_format: str = "png",
    webhook: Optional[str] = None,
    out: Path = Path("out"),
) -> None:
    """Submit an edit job, show a progress bar until it is done, save the output(s)."""
    from cli.client import ApiError, JobsClient
    from cli.progress import follow

    client = JobsClient(api_url, api_key)
    try:
        job = client.submit_file(image, {"operation": "edit", "prompt": prompt, "seed": seed, "steps": steps,
                                         "true_cfg_scale": true_cfg_scale, "output_format": output_format,
                                         "webhook": webhook})
    except ApiError as exc:
        typer.echo(f"rejected: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"job {job['id']} queued")
    job = follow(client, job["id"])
    if job["status"] != "succeeded":
        typer.echo(f"job {job['status']}: {job.get('error')}", err=True)
        raise typer.Exit(1)
    for index, output in enumerate(job["outputs"]):
        path = client.download(output["url"], out / f"{job['id']}-{index}.{output['key'].rsplit('.', 1)[-1]}")
        typer.echo(f"saved {path}")


@model_app.command("tiny")
def model_tiny(directory: Path, seed: int = 0) -> None:
    """Build a tiny random-weight Qwen-Image-Edit pipeline with the real classes (for tests and demos)."""
    from workers.pipeline.tiny import build_tiny_edit_model

    path = build_tiny_edit_model(directory, seed=seed)
    typer.echo(str(path))


if __name__ == "__main__":
    app()
