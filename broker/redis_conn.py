"""One place that turns ``EDITFARM_REDIS_URL`` into Redis clients and the Celery broker, plain or behind Sentinel.

A plain ``redis://`` / ``rediss://`` URL is used as it is. A Sentinel deployment (a primary with
replicas, promoted by Redis Sentinel) is named by one URL too, so every component that takes the
Redis URL (job store, Celery broker, event stream, limits, webhook outbox) accepts it unchanged::

    redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/<master name>[/<db>]
        [?sentinel_password=...&sentinel_username=...&ssl=true&ssl_ca_certs=/path/ca.pem]

``password`` (and ``user``) authenticate to the primary; ``sentinel_password`` to the sentinels
(default: none). ``ssl=true`` speaks TLS to both. Clients ask the sentinels for the current primary
on every new connection, so after a failover they reconnect to the promoted replica without a
restart (a write in flight on the old primary fails and is retried by its caller, as for any
connection loss).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

SENTINEL_SCHEME = "redis+sentinel"
_TRUE = {"1", "true", "yes", "on"}


class RedisURLError(ValueError):
    """The Redis URL cannot be used (names no sentinel or no master)."""


@dataclass(frozen=True)
class SentinelConfig:
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False
    ssl_options: dict[str, str] = field(default_factory=dict)

    def master_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the primary (and, with TLS, the sentinels)."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        if self.ssl:
            kwargs.update(ssl=True, **self.ssl_options)
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        if self.ssl:
            kwargs.update(ssl=True, **self.ssl_options)
        return kwargs


def parse_sentinel_url(url: str) -> SentinelConfig | None:
    """The Sentinel configuration ``url`` names, or None for a plain Redis URL.

    Raises:
        RedisURLError: a ``redis+sentinel://`` URL without a sentinel address or a master name.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_address(item) for item in hosts.split(",") if item]
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path:
        raise RedisURLError("a redis+sentinel URL names sentinels (host:port,...) and a master: "
                            "redis+sentinel://host:26379,host:26379/<master>/<db>")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
    ssl_options: dict[str, str] = {k: query[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
                   if k in query}
    return SentinelConfig(
        sentinels=tuple(sentinels), master_name=urllib.parse.unquote(path[0]),
        db=int(path[1]) if len(path) > 1 else 0,
        username=urllib.parse.unquote(username) or None, password=urllib.parse.unquote(password) or None,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
        ssl=query.get("ssl", "").lower() in _TRUE, ssl_options=ssl_options,
    )


def client_from_url(url: str, **kwargs: Any) -> redis.Redis:
    """A blocking client for ``url`` (``redis.Redis.from_url`` for a plain one); ``kwargs`` as there."""
    config = parse_sentinel_url(url)
    if config is None:
        return redis.Redis.from_url(url, **kwargs)
    # redis-py's Sentinel is untyped: Any here, the client's type below
    manager: Any = cast(Any, redis.sentinel.Sentinel)(list(config.sentinels), sentinel_kwargs=config.sentinel_kwargs(),
                                      socket_connect_timeout=kwargs.get("socket_connect_timeout"),
                                      socket_timeout=kwargs.get("socket_timeout"))
    return cast(redis.Redis, manager.master_for(config.master_name, redis_class=redis.Redis,
                                                **config.master_kwargs(), **kwargs))


def async_client_from_url(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """An asyncio client for ``url`` (``redis.asyncio.Redis.from_url`` for a plain one)."""
    config = parse_sentinel_url(url)
    if config is None:
        return redis.asyncio.Redis.from_url(url, **kwargs)
    manager: Any = cast(Any, redis.asyncio.sentinel.Sentinel)(
        list(config.sentinels), sentinel_kwargs=config.sentinel_kwargs(),
        socket_connect_timeout=kwargs.get("socket_connect_timeout"), socket_timeout=kwargs.get("socket_timeout"))
    return cast(redis.asyncio.Redis, manager.master_for(config.master_name, redis_class=redis.asyncio.Redis,
                                                        **config.master_kwargs(), **kwargs))


@dataclass(frozen=True)
class CeleryBroker:
    url: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    use_ssl: dict[str, Any] | None = None  # Celery's ``broker_use_ssl``


def celery_broker(url: str) -> CeleryBroker:
    """Celery's broker for ``url``: kombu's ``sentinel://`` transport with ``master_name`` (and the
    sentinels' credentials) for a Sentinel URL; a plain URL as it is."""
    config = parse_sentinel_url(url)
    if config is None:
        return CeleryBroker(url)
    auth = ""
    if config.password:
        user = urllib.parse.quote(config.username or "", safe="")
        auth = f"{user}:{urllib.parse.quote(config.password, safe='')}@"
    broker = ";".join(f"sentinel://{auth}{_host(host)}:{port}/{config.db}" for host, port in config.sentinels)
    options: dict[str, Any] = {"master_name": config.master_name}
    if sentinel_kwargs := config.sentinel_kwargs():
        options["sentinel_kwargs"] = sentinel_kwargs
    # kombu takes TLS only from a non-empty dict; a certificate is required unless the URL says otherwise
    use_ssl = {"ssl_cert_reqs": "required", **config.ssl_options} if config.ssl else None
    return CeleryBroker(broker, options, use_ssl)


def _address(item: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (Sentinel's port 26379)."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    return host, int(port) if port else 26379


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
