"""`editfarm models …`: the model catalog (broker/catalog.py) from the command line.

``editfarm models check [FILE]`` validates a catalog the way the API and the workers will at
start and prints it, or prints every problem and exits 2: run it in CI or before a rollout.
``editfarm models list`` asks a running cluster (``GET /v1/models``, through the SDK) which models
jobs may name and what each pool is doing now; its exit codes are those of ``editfarm jobs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from broker.catalog import Catalog, CatalogError, ModelSpec, load_catalog, load_catalog_file
from cli.jobs import ApiKey, ApiUrl, AsJson, client_for, fail

if TYPE_CHECKING:
    from editfarm_client import Model

models_app = typer.Typer(help="The model catalog: check a file (EDITFARM_MODELS_FILE), list a running cluster's models.",
                         no_args_is_help=True)


@models_app.command("check")
def check(
    file: Path | None = typer.Argument(None, help="the catalog; default: EDITFARM_MODELS_FILE, else "
                                                  "EDITFARM_MODEL as a one-model catalog"),
    as_json: bool = typer.Option(False, "--json", help="print the validated catalog as JSON"),
) -> None:
    """Validate a model catalog and print it; on any problem print them all and exit 2."""
    try:
        catalog = load_catalog_file(file) if file is not None else _from_settings()
    except CatalogError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(catalog.to_dict(), indent=2) if as_json else describe(catalog))


@models_app.command("list")
def list_models(api_url: str = ApiUrl, api_key: str = ApiKey, as_json: bool = AsJson) -> None:
    """The models a running cluster serves, with their pools' live state (GET /v1/models)."""
    from editfarm_client import EditfarmError

    try:
        models = client_for(api_url, api_key).models()
    except EditfarmError as exc:
        raise fail(exc, as_json) from None
    if as_json:
        typer.echo(json.dumps({"object": "list", "data": [m.raw for m in models]}))
        return
    typer.echo(table(models))


def table(models: list[Model]) -> str:
    """One row per model: its name, pipeline, the operations it serves (``*``: it is their default),
    render workers ready, jobs queued and running, and the median render seconds (``-``: none yet)."""
    header = ("NAME", "PIPELINE", "OPERATIONS", "WORKERS", "QUEUED", "RUNNING", "MEDIAN S")
    rows = [header]
    for model in models:
        operations = ",".join(op + ("*" if op in model.default_for else "") for op in model.operations)
        median = model.state.median_render_s
        rows.append((model.name, model.pipeline, operations, str(model.state.workers_ready),
                     str(model.state.queued), str(model.state.running), "-" if median is None else f"{median:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    # text columns left-aligned, counts right-aligned
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n(* the default model of that operation)"


def _from_settings() -> Catalog:
    from broker.settings import ClusterSettings

    settings = ClusterSettings()
    return load_catalog(models_file=settings.models_file, model=settings.model)


def describe(catalog: Catalog) -> str:
    """The catalog for a person: one block per model, then the default model per operation."""
    count = f"{len(catalog)} model{'s' if len(catalog) != 1 else ''}"
    blocks = [f"{catalog.origin}: valid, {count}"]
    blocks += [_describe_model(spec) for spec in catalog]
    served = [(op, spec) for op, spec in ((op, catalog.default_for(op)) for op in _operations()) if spec]
    blocks.append("default model per operation:\n" + "\n".join(f"  {op:<10} {spec.name}" for op, spec in served))
    return "\n\n".join(blocks)


def _operations() -> list[str]:
    from broker.schema import Operation

    return [op.value for op in Operation]


def _describe_model(spec: ModelSpec) -> str:
    rows = [
        ("pipeline", spec.pipeline),
        ("source", spec.source),
        ("operations", ", ".join(op.value for op in spec.operations)),
    ]
    defaults = [f"steps {spec.defaults.steps}" if spec.defaults.steps is not None else "",
                f"true_cfg_scale {spec.defaults.true_cfg_scale:g}" if spec.defaults.true_cfg_scale is not None
                else ""]
    defaults += [f"scheduler.{key} {json.dumps(value)}" for key, value in spec.defaults.scheduler.items()]
    if any(defaults):
        rows.append(("defaults", ", ".join(d for d in defaults if d)))
    rows += [("fuse lora", f"{lora.uri} (scale {lora.scale:g})") for lora in spec.fuse_loras]
    if spec.max_side_px is not None:
        rows.append(("max side", f"{spec.max_side_px} px"))
    if spec.default_for:
        rows.append(("default for", ", ".join(op.value for op in spec.default_for)))
    if spec.profile is not None:
        rows.append(("profile", spec.profile))
    return spec.name + "".join(f"\n  {label:<12} {value}" for label, value in rows)
