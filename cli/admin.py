"""`editfarm keys …` and `editfarm webhook-secret …`: tenant credentials, for operators.

Talks to Redis directly (``EDITFARM_REDIS_URL``): run it where the cluster's Redis is reachable.
"""

from __future__ import annotations

import datetime as dt
import json

import typer

keys_app = typer.Typer(help="API keys (stored hashed; a new key is printed once).", no_args_is_help=True)
secrets_app = typer.Typer(help="Per-tenant webhook signing secrets.", no_args_is_help=True)


def _store():  # type: ignore[no-untyped-def]
    from broker.redis_conn import client_from_url
    from broker.settings import ClusterSettings
    from broker.tenants import RedisTenantStore

    return RedisTenantStore(client_from_url(ClusterSettings().redis_url))


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@keys_app.command("create")
def create(tenant: str = typer.Option(..., "--tenant")) -> None:
    """Create a key for TENANT and print it (the only time it is shown)."""
    from api.auth import TENANT_RE

    if not TENANT_RE.match(tenant):
        typer.echo("tenant names are letters, digits, '_', '.', '-' (at most 64)", err=True)
        raise typer.Exit(2)
    info, key = _store().create_key(tenant)
    typer.echo(f"{info.key_id}  tenant={tenant}", err=True)
    typer.echo(key)


@keys_app.command("list")
def list_keys(tenant: str = typer.Option(None, "--tenant"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Keys (ids, tenants, dates; never the keys)."""
    infos = _store().list_keys(tenant)
    if as_json:
        typer.echo(json.dumps([info.__dict__ for info in infos]))
        return
    for info in infos:
        state = f"revoked {_when(info.revoked_at)}" if info.revoked_at else "active"
        typer.echo(f"{info.key_id}  {info.tenant:<16} created {_when(info.created_at)}  {state}")


@keys_app.command("revoke")
def revoke(key_id: str) -> None:
    """Revoke a key by id; requests with it get 401 from then on."""
    if not _store().revoke(key_id):
        typer.echo(f"no active key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@secrets_app.command("rotate")
def rotate(tenant: str = typer.Option(..., "--tenant"),
           overlap_s: float = typer.Option(86400, help="how long the previous secret keeps signing")) -> None:
    """Make a new signing secret for TENANT and print it; until the overlap ends, messages carry
    signatures by both the new and the previous secret."""
    typer.echo(_store().rotate_webhook_secret(tenant, overlap_s))
