"""`editfarm`: run the API, the workers, a whole local cluster, submit jobs, build the tiny model."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from workers.serving import Served

app = typer.Typer(help="editfarm: a render farm for Qwen-Image-Edit pipelines.", no_args_is_help=True)
model_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@app.command()
def api(host: str = "0.0.0.0", port: int = 8000, workers: int = 1) -> None:
    """Run the submission API (uvicorn)."""
    import uvicorn

    from api.deps import api_catalog
    from api.settings import ApiSettings
    from broker.catalog import CatalogError

    try:
        api_catalog(ApiSettings())  # an invalid catalog stops the API here, with the file, entry and reason
    except CatalogError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers)


@app.command()
def worker(
    gpus: str = typer.Option("", help="all, a list like 0,2, or cpu: one worker process per GPU"),
    device: str = typer.Option("auto", help="cpu, cuda or auto (when --gpus is not given)"),
    queues: str = typer.Option("render", help="render (GPU jobs) or webhooks (CPU deliveries, reaper)"),
    model: str = typer.Option("", help="the catalog's model this render worker serves (EDITFARM_WORKER_MODEL); "
                                       "default: the catalog's only model"),
    concurrency: int = typer.Option(8, help="threads of a webhook worker"),
    name: str = typer.Option("", help="Celery node name, e.g. gpu0-qwen-image@%h"),
) -> None:
    """Run workers: render jobs of one model (one Celery prefork process per GPU, model loaded in the
    child) or webhook deliveries (CPU threads)."""
    from cli.gpus import parse_gpus, supervise

    if queues == "webhooks":
        _celery_worker("webhooks", ["-Q", "webhooks", "-P", "threads", "-c", str(concurrency),
                                    "-n", name or "webhooks@%h"])
        return
    if model:
        os.environ["EDITFARM_WORKER_MODEL"] = model
    served = _served_or_exit()
    if gpus:
        try:
            pinned = parse_gpus(gpus)
        except (ValueError, RuntimeError) as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        if pinned is None:
            device, name = "cpu", name or f"cpu-{served.name}@%h"
        elif len(pinned) > 1:
            raise typer.Exit(supervise(pinned, [], model=served.name))
        else:
            # one card: pin it here and run in this process (Kubernetes: one pod per GPU)
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", pinned[0])
            device, name = "cuda", name or f"gpu{pinned[0]}-{served.name}@%h"
    os.environ["EDITFARM_DEVICE"] = device
    # only its model's queues, in strict priority order (Flower shows the model in the node name)
    _celery_worker("render", ["-Q", ",".join(served.queues), "-P", "prefork", "-c", "1",
                              "-n", name or f"render-{served.name}@%h"])


def _served_or_exit() -> Served:
    """The model this render worker serves; an invalid catalog or model name ends the command (exit 2)
    with the file, the entry and the reason, before anything loads."""
    from broker.catalog import CatalogError
    from workers.serving import served_model
    from workers.settings import WorkerSettings

    try:
        return served_model(WorkerSettings())
    except CatalogError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _celery_worker(role: str, argv: list[str]) -> None:
    os.environ["EDITFARM_WORKER_ROLE"] = role
    from workers.celery_worker import app as celery_app

    celery_app.worker_main(["worker", *argv, "-E", "--without-gossip", "--without-mingle", "-l", "INFO"])


@app.command()
def flower(port: int = 5555, address: str = "0.0.0.0") -> None:
    """Run Flower against the cluster's broker (basic auth from FLOWER_BASIC_AUTH=user:password)."""
    from workers.celery_worker import app as celery_app

    argv = ["flower", f"--port={port}", f"--address={address}"]
    auth = os.environ.get("FLOWER_BASIC_AUTH")
    if auth:
        argv.append(f"--basic-auth={auth}")
    celery_app.start(argv)


probe_app = typer.Typer(help="Probes for Kubernetes and compose health checks.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")


@probe_app.command("ready")
def probe_ready() -> None:
    """Exit 0 once the worker has loaded and warmed up its model (its ready file exists)."""
    from workers.settings import WorkerSettings

    raise typer.Exit(0 if Path(WorkerSettings().ready_file).exists() else 1)


@probe_app.command("live")
def probe_live(max_age_s: float = 60.0) -> None:
    """Exit 0 while the worker's heartbeat file is fresher than --max-age-s."""
    from workers.settings import WorkerSettings

    path = Path(WorkerSettings().heartbeat_file)
    fresh = path.exists() and time.time() - path.stat().st_mtime <= max_age_s
    raise typer.Exit(0 if fresh else 1)


@app.command()
def dev(workdir: Path = Path(".editfarm"), port: int = 8000,
        models: Path | None = typer.Option(None, help="a model catalog (default: EDITFARM_MODELS_FILE); "
                                                      "then --pool says how many workers serve each model"),
        pool: list[str] = typer.Option([], help="MODEL=N: N render workers serving MODEL (repeat; default: "
                                                "one per model of the catalog)")) -> None:
    """A whole local cluster in one foreground command; Ctrl-C, SIGTERM or SIGHUP stops it all.

    The EDITFARM_ settings you export reach every process (renderer, URL policy, limits…), but for
    those the cluster manages itself (its Redis, S3 server, keys, per-process files). Everything it
    writes stays under --workdir. With a catalog (--models), one pool of render workers per model.
    """
    from cli.cluster import ClusterConfig, LocalCluster, exported_settings
    from cli.lifetime import Stopped, stop_on_signals

    catalog = models or (Path(os.environ["EDITFARM_MODELS_FILE"]) if os.environ.get("EDITFARM_MODELS_FILE") else None)
    pools = _pools(catalog, pool)
    config = ClusterConfig(workdir=workdir.resolve(), redis_url=os.environ.get("EDITFARM_REDIS_URL"),
                           model=os.environ.get("EDITFARM_MODEL"), api_port=port,
                           models_file=catalog.resolve() if catalog else None, render_pools=pools,
                           device=os.environ.get("EDITFARM_DEVICE", "cpu"),
                           api_keys=os.environ.get("EDITFARM_API_KEYS", ""),
                           webhook_secret=os.environ.get("EDITFARM_WEBHOOK_SECRET", ""),
                           user_env=exported_settings(os.environ), die_with_parent=True)
    typer.echo("starting local cluster…")
    try:
        # from here on Ctrl-C, SIGTERM or SIGHUP unwinds the with-block (or the start), which stops
        # every process; a SIGKILL leaves that to the kernel (die_with_parent)
        with stop_on_signals((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)), LocalCluster(config) as cluster:
            typer.echo(f"API      {cluster.api_url}   (docs: {cluster.api_url}/docs)")
            typer.echo(f"API key  {cluster.api_key()}")
            typer.echo(f"Redis    {cluster.redis_url}")
            typer.echo(f"S3       {cluster.s3_url}  bucket editfarm")
            typer.echo(f"logs     {cluster.workdir / 'logs'}")
            typer.echo("Ctrl-C to stop")
            while True:
                time.sleep(1)
    except Stopped as stopped:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            typer.echo(f"stopped ({stopped})")


def _pools(catalog: Path | None, specs: list[str]) -> dict[str, int]:
    """``--pool MODEL=N`` options as {model: workers}; every model of ``catalog`` once when none is given.
    Exits 2 on an invalid catalog or option."""
    if catalog is None:
        if specs:
            typer.echo("--pool needs a catalog (--models or EDITFARM_MODELS_FILE)", err=True)
            raise typer.Exit(2)
        return {}
    from broker.catalog import CatalogError, load_catalog_file

    try:
        names = load_catalog_file(catalog).names
    except CatalogError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if not specs:
        return dict.fromkeys(names, 1)
    pools: dict[str, int] = {}
    for spec in specs:
        model, _, count = spec.partition("=")
        if model not in names or not count.isdigit():
            typer.echo(f"--pool takes MODEL=N with MODEL one of {', '.join(names)}; got {spec!r}", err=True)
            raise typer.Exit(2)
        pools[model] = int(count)
    return pools


@app.command()
def demo(workdir: Path = Path(".editfarm/demo"), out: Path = Path("out")) -> None:
    """Start a local cluster, edit the sample image, verify the signed webhook, save the output."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(workdir.resolve(), out.resolve()))


from cli.admin import keys_app, secrets_app  # noqa: E402
from cli.jobs import jobs_app, submit  # noqa: E402 - the job commands live in their own module
from cli.retention import retention_app, storage_app  # noqa: E402

app.command()(submit)
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="keys")
app.add_typer(secrets_app, name="webhook-secret")
app.add_typer(storage_app, name="storage")
app.add_typer(retention_app, name="retention")


@model_app.command("tiny")
def model_tiny(
    directory: Path,
    seed: int = 0,
    pipeline: str = typer.Option("QwenImageEditPipeline",
                                 help="the pipeline class: QwenImagePipeline, QwenImageEditPipeline, "
                                      "QwenImageEditPlusPipeline, QwenImageEditInpaintPipeline, "
                                      "QwenImage21Pipeline"),
) -> None:
    """Build a tiny random-weight Qwen-Image model of one pipeline class with the real classes
    (for tests and demos); it loads with that class's from_pretrained."""
    from broker.catalog import KNOWN_PIPELINES

    if pipeline not in KNOWN_PIPELINES:  # before importing diffusers: a typo answers at once
        typer.echo(f"unknown pipeline {pipeline!r}; one of {', '.join(KNOWN_PIPELINES)}", err=True)
        raise typer.Exit(2)
    from workers.pipeline.tiny import build_tiny_model

    path = build_tiny_model(directory, pipeline=pipeline, seed=seed)
    typer.echo(str(path))


from cli.models import models_app  # noqa: E402 - the catalog commands live in their own module

app.add_typer(models_app, name="models")


if __name__ == "__main__":
    app()
