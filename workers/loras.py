"""A job's LoRA uris → local ``.safetensors`` files, cached on the worker's disk.

``s3://<bucket>/<key>.safetensors`` is read with the runner's object store (the cluster's
bucket, or one of ``EDITFARM_LORA_BUCKETS`` with the same credentials); ``https://`` URLs are
fetched with httpx under the URL policy (``EDITFARM_ALLOW_PRIVATE_URLS`` /
``EDITFARM_ALLOW_HTTP_URLS``, as the API applies it at submit), every redirect hop and every
connected address checked, with a byte cap.

Cache layout under ``cache_dir`` (default ``/tmp/editfarm/loras``)::

    files/<sha256>.safetensors     the content, named by its SHA-256 (written atomically)
    index/<sha256 of uri>.json     {"uri", "etag", "sha256"}: what the uri held when last fetched

An S3 object is re-downloaded only when its ETag changed (one HEAD per job); an https file
is asked for with ``If-None-Match`` and a 304 reuses the cached copy. Without an ETag
(in-memory stores, servers that send none) the content is fetched and, if its SHA-256 is
already cached, not written again. Least recently used files beyond ``max_cache_bytes`` are
deleted. ``LoraCache`` (workers/pipeline/lora.py) keys loaded adapters by the same content hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpcore
import httpx
from pydantic import Field

from broker.netfailure import describe_network_failure
from broker.schema import lora_location
from broker.settings import ClusterSettings
from broker.urlpolicy import UrlNotAllowed, check_url, is_allowed_address, system_resolver
from storage import ObjectNotFound, ObjectStore, StorageUnavailable
from storage.store import S3ObjectStore

__all__ = ["LoraResolver", "LoraSettings", "LoraUnavailable"]

log = logging.getLogger("editfarm.loras")

GIB = 1024**3
MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 1 << 20


class LoraUnavailable(Exception):
    """A LoRA file cannot be had (no such object, URL refused or failing, over the byte cap):
    the job's input is at fault; it fails with ``input_unreadable``."""


class LoraSettings(ClusterSettings):
    """``EDITFARM_`` settings of LoRA downloads on a render worker."""

    lora_cache_dir: str = "/tmp/editfarm/loras"
    lora_max_bytes: int = Field(default=4 * GIB, gt=0)  # one file
    lora_cache_max_bytes: int = Field(default=40 * GIB, gt=0)  # the whole cache
    lora_fetch_timeout_s: float = Field(default=600.0, gt=0)  # one https download, all hops
    # the API's URL policy settings, read from the same variables
    allow_private_urls: bool = False
    allow_http_urls: bool = False


class _GuardedBackend(httpcore.NetworkBackend):
    """Connects only to addresses the URL policy allows (a DNS answer that changed since the
    check cannot reach a private or metadata address)."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                    ) -> httpcore.NetworkStream:
        addresses = system_resolver(host, port)
        if not addresses or not all(is_allowed_address(a, self.allow_private) for a in addresses):
            raise UrlNotAllowed(f"host {host!r} resolves to a non-public address")
        last: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
                            ) -> httpcore.NetworkStream:
        raise UrlNotAllowed("unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _GuardedTransport(httpx.BaseTransport):
    def __init__(self, allow_private: bool) -> None:
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), max_connections=2,
                                             network_backend=_GuardedBackend(allow_private))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        response = self._pool.handle_request(httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions,
        ))
        assert isinstance(response.stream, typing.Iterable)
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_Stream(response.stream), extensions=response.extensions)

    def close(self) -> None:
        self._pool.close()


class _Stream(httpx.SyncByteStream):
    def __init__(self, inner: typing.Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> typing.Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


@dataclasses.dataclass
class LoraResolver:
    """Resolves LoRA uris to local files (see the module doc). Not thread-safe per instance;
    several processes may share one ``cache_dir`` (files are written atomically).

    Attributes:
        objects: the runner's object store (the cluster's bucket).
        bucket: the cluster's bucket name (``s3://<bucket>/...`` reads from ``objects``).
        cache_dir: where files are cached.
        extra_buckets: other buckets that s3 uris may name (needs an ``S3ObjectStore``).
        max_bytes: largest file accepted.
        max_cache_bytes: the cache is trimmed to this after each download.
        allow_private, allow_http: the URL policy for https uris.
        timeout_s: one https download, all hops.
    """

    objects: ObjectStore
    bucket: str
    cache_dir: Path = Path("/tmp/editfarm/loras")
    extra_buckets: tuple[str, ...] = ()
    max_bytes: int = 4 * GIB
    max_cache_bytes: int = 40 * GIB
    allow_private: bool = False
    allow_http: bool = False
    timeout_s: float = 600.0
    _stores: dict[str, ObjectStore] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, objects: ObjectStore, settings: LoraSettings | None = None) -> LoraResolver:
        s = settings or LoraSettings()
        return cls(objects=objects, bucket=s.s3_bucket, cache_dir=Path(s.lora_cache_dir),
                   extra_buckets=tuple(s.lora_bucket_list()), max_bytes=s.lora_max_bytes,
                   max_cache_bytes=s.lora_cache_max_bytes, allow_private=s.allow_private_urls,
                   allow_http=s.allow_http_urls, timeout_s=s.lora_fetch_timeout_s)

    # -- public ----------------------------------------------------------------------------------

    def resolve(self, uri: str) -> str:
        """The local path of ``uri``'s file, downloading it if the cache lacks it.

        Raises:
            LoraUnavailable: not a LoRA uri, no such object, bucket not allowed, URL refused or
                failing, file over ``max_bytes``.
            StorageUnavailable: the object store is unreachable (worth retrying the job).
        """
        try:
            scheme, where, key = lora_location(uri)
        except ValueError as exc:
            raise LoraUnavailable(f"LoRA {uri!r}: {exc}") from None
        if scheme == "s3":
            return str(self._from_s3(uri, where, key))
        return str(self._from_url(uri))

    # -- cache -----------------------------------------------------------------------------------

    def _file(self, digest: str) -> Path:
        return self.cache_dir / "files" / f"{digest}.safetensors"

    def _index(self, uri: str) -> Path:
        return self.cache_dir / "index" / f"{hashlib.sha256(uri.encode()).hexdigest()}.json"

    def _cached(self, uri: str, etag: str | None) -> Path | None:
        """The cached file of ``uri`` if it was fetched with this ``etag`` (None: never valid)."""
        if not etag:
            return None
        try:
            entry = json.loads(self._index(uri).read_text())
        except (OSError, ValueError):
            return None
        if entry.get("uri") != uri or entry.get("etag") != etag:
            return None
        path = self._file(str(entry.get("sha256", "")))
        if not path.is_file():
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: trimmed last
        return path

    def _store(self, uri: str, etag: str | None, chunks: Iterable[bytes]) -> Path:
        """Write ``chunks`` into the cache (atomically, capped at ``max_bytes``), index ``uri``."""
        files = self.cache_dir / "files"
        files.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=files, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise LoraUnavailable(f"LoRA {uri!r} is larger than {self.max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            path = self._file(digest.hexdigest())
            if path.is_file():
                os.utime(path)
            else:
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        index = self._index(uri)
        index.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=index.parent, prefix=".part-")
        with os.fdopen(fd, "w") as out:
            json.dump({"uri": uri, "etag": etag, "sha256": digest.hexdigest()}, out)
        os.replace(tmp, index)
        log.info("LoRA %s cached as %s (%d bytes)", uri, path.name, size)
        self._trim(keep=path)
        return path

    def _trim(self, keep: Path) -> None:
        """Delete least recently used files until the cache fits ``max_cache_bytes``."""
        try:
            files = (self.cache_dir / "files").glob("*.safetensors")
            entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in files]
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_cache_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                log.info("LoRA cache: %s removed (cache over %d bytes)", path.name, self.max_cache_bytes)

    # -- s3 --------------------------------------------------------------------------------------

    def _store_for(self, uri: str, bucket: str) -> ObjectStore:
        if bucket == self.bucket:
            return self.objects
        if bucket not in self.extra_buckets:
            raise LoraUnavailable(f"LoRA {uri!r}: bucket {bucket!r} is not allowed")
        if bucket not in self._stores:
            if not isinstance(self.objects, S3ObjectStore):
                raise LoraUnavailable(f"LoRA {uri!r}: bucket {bucket!r} cannot be read here")
            self._stores[bucket] = S3ObjectStore(dataclasses.replace(self.objects.config, bucket=bucket))
        return self._stores[bucket]

    def _from_s3(self, uri: str, bucket: str, key: str) -> Path:
        store = self._store_for(uri, bucket)
        try:
            etag = _s3_etag(store, key)
            cached = self._cached(uri, etag)
            if cached is not None:
                return cached
            got_etag, chunks = _s3_open(store, key)
            return self._store(uri, got_etag or etag, chunks)
        except ObjectNotFound:
            raise LoraUnavailable(f"LoRA {uri!r}: no such object") from None

    # -- https -----------------------------------------------------------------------------------

    def _from_url(self, uri: str) -> Path:
        url = uri
        try:
            with httpx.Client(transport=_GuardedTransport(self.allow_private), trust_env=False,
                              follow_redirects=False, timeout=self.timeout_s,
                              headers={"User-Agent": "editfarm-worker/1"}) as client:
                for _hop in range(MAX_REDIRECTS + 1):
                    check_url(url, allow_http=self.allow_http, allow_private=self.allow_private)
                    headers = {}
                    entry = self._index_entry(uri)
                    if entry.get("etag") and self._file(str(entry.get("sha256", ""))).is_file():
                        headers["If-None-Match"] = str(entry["etag"])
                    with client.stream("GET", url, headers=headers) as response:
                        if response.status_code in _REDIRECTS and "location" in response.headers:
                            url = str(response.url.join(response.headers["location"]))
                            continue
                        if response.status_code == 304 and headers:
                            cached = self._cached(uri, headers["If-None-Match"])
                            if cached is not None:
                                return cached
                        if response.status_code != 200:
                            raise LoraUnavailable(f"LoRA URL answered HTTP {response.status_code}")
                        declared = response.headers.get("content-length", "")
                        if declared.isdigit() and int(declared) > self.max_bytes:
                            raise LoraUnavailable(f"LoRA {uri!r} is larger than {self.max_bytes} bytes")
                        return self._store(uri, response.headers.get("etag"), response.iter_bytes(_CHUNK))
                raise LoraUnavailable(f"LoRA URL redirected more than {MAX_REDIRECTS} times")
        except UrlNotAllowed as exc:
            raise LoraUnavailable(f"LoRA URL not allowed: {exc}") from None
        except (httpx.HTTPError, httpx.InvalidURL, httpcore.NetworkError, httpcore.TimeoutException,
                httpcore.ProtocolError) as exc:
            code, sentence = describe_network_failure(exc)
            raise LoraUnavailable(f"could not fetch the LoRA URL ({code}: {sentence})") from exc

    def _index_entry(self, uri: str) -> dict[str, object]:
        try:
            entry = json.loads(self._index(uri).read_text())
        except (OSError, ValueError):
            return {}
        return entry if isinstance(entry, dict) and entry.get("uri") == uri else {}


def _s3_etag(store: ObjectStore, key: str) -> str | None:
    """The object's ETag from a HEAD (S3 stores), or None where the store has none.
    Raises ObjectNotFound, StorageUnavailable."""
    if not isinstance(store, S3ObjectStore):
        if not store.exists(key):
            raise ObjectNotFound(key)
        return None
    import botocore.exceptions

    try:
        head = store.client.head_object(Bucket=store.bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
            raise ObjectNotFound(key) from exc
        raise StorageUnavailable(f"head {key!r} failed: {type(exc).__name__}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageUnavailable(f"head {key!r} failed: {type(exc).__name__}") from exc
    etag = head.get("ETag")
    return str(etag) if etag else None


def _s3_open(store: ObjectStore, key: str) -> tuple[str | None, Iterator[bytes]]:
    """(ETag, the object's bytes in chunks): streamed from S3 stores, one chunk from others.
    Raises ObjectNotFound, StorageUnavailable."""
    if not isinstance(store, S3ObjectStore):
        return None, iter([store.get(key)])
    import botocore.exceptions

    def chunks(body: typing.Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(_CHUNK)
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageUnavailable(f"get {key!r} failed: {type(exc).__name__}") from exc
        finally:
            body.close()

    try:
        response = store.client.get_object(Bucket=store.bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
            raise ObjectNotFound(key) from exc
        raise StorageUnavailable(f"get {key!r} failed: {type(exc).__name__}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageUnavailable(f"get {key!r} failed: {type(exc).__name__}") from exc
    etag = response.get("ETag")
    return (str(etag) if etag else None), chunks(response["Body"])
