"""`editfarm storage lifecycle …` (the bucket's object retention) and `editfarm retention …` (a
tenant's job retention), for operators. Uses the cluster's settings (``EDITFARM_S3_*``,
``EDITFARM_REDIS_URL``, ``EDITFARM_OBJECT_RETENTION_DAYS``)."""

from __future__ import annotations

import json

import typer

storage_app = typer.Typer(help="The object store.", no_args_is_help=True)
lifecycle_app = typer.Typer(help="The bucket's lifecycle rule (object retention).", no_args_is_help=True)
storage_app.add_typer(lifecycle_app, name="lifecycle")
retention_app = typer.Typer(help="How long a tenant's finished jobs stay in Redis.", no_args_is_help=True)


def _objects():  # type: ignore[no-untyped-def]
    from broker.settings import ClusterSettings
    from storage import S3Config, S3ObjectStore

    s = ClusterSettings()
    secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None
    return s, S3ObjectStore(S3Config(bucket=s.s3_bucket, endpoint_url=s.s3_endpoint_url, region=s.s3_region,
                                     access_key_id=s.s3_access_key_id, secret_access_key=secret,
                                     path_style=s.s3_path_style))


@lifecycle_app.command("apply")
def lifecycle_apply(days: int = typer.Option(0, help="days to keep (default EDITFARM_OBJECT_RETENTION_DAYS)")) -> None:
    """Write the rule that deletes objects under tenants/ DAYS after they were written."""
    from storage import StorageUnavailable
    from storage.lifecycle import apply_retention

    settings, objects = _objects()
    days = days or settings.object_retention_days
    if days <= 0:
        typer.echo("give --days or set EDITFARM_OBJECT_RETENTION_DAYS (at least 1)", err=True)
        raise typer.Exit(2)
    try:
        rules = apply_retention(objects, days)
    except StorageUnavailable as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(rules, indent=2))


@lifecycle_app.command("show")
def lifecycle_show() -> None:
    """Print the bucket's lifecycle rules."""
    from storage import StorageUnavailable
    from storage.lifecycle import current_rules

    try:
        typer.echo(json.dumps(current_rules(_objects()[1]), indent=2))
    except StorageUnavailable as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


def _tenants():  # type: ignore[no-untyped-def]
    from broker.redis_conn import client_from_url
    from broker.settings import ClusterSettings
    from broker.tenants import RedisTenantStore

    return RedisTenantStore(client_from_url(ClusterSettings().redis_url))  # plain or Sentinel


@retention_app.command("set")
def retention_set(tenant: str = typer.Option(..., "--tenant"),
                  seconds: int = typer.Option(..., "--seconds", min=1)) -> None:
    """Give TENANT its own job retention (new jobs get it; a job may still ask for a shorter one)."""
    _tenants().set_retention_s(tenant, seconds)
    typer.echo(f"tenant={tenant} retention_s={seconds}")


@retention_app.command("clear")
def retention_clear(tenant: str = typer.Option(..., "--tenant")) -> None:
    """TENANT's new jobs get EDITFARM_JOB_RETENTION_S again."""
    _tenants().set_retention_s(tenant, None)


@retention_app.command("show")
def retention_show(tenant: str = typer.Option(..., "--tenant")) -> None:
    """TENANT's own retention in seconds, or 'default'."""
    value = _tenants().retention_s(tenant)
    typer.echo("default" if value is None else str(value))


@retention_app.command("backfill")
def retention_backfill() -> None:
    """Index finished jobs recorded before retention existed, so the sweeper finds them (run once
    after upgrading; harmless to run again)."""
    from broker.redis_conn import client_from_url
    from broker.retention import RetentionIndex
    from broker.settings import ClusterSettings

    added = RetentionIndex(client_from_url(ClusterSettings().redis_url)).backfill()
    typer.echo(f"{added} finished job(s) added to the expiry index")
