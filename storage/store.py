"""Object stores: a base, the S3 implementation, and an in-memory stand-in for unit tests."""

from __future__ import annotations

import abc
import hashlib
import threading
import urllib.parse
from dataclasses import dataclass

import boto3
import botocore.exceptions
from botocore.config import Config


class StorageError(Exception):
    """Any object-store failure."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class StorageUnavailable(StorageError):
    """The store could not be reached or refused the call; worth retrying later."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size_bytes: int
    content_type: str


class ObjectStore(abc.ABC):
    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Store ``data`` under ``key``. Raises StorageUnavailable."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes. Raises ObjectNotFound or StorageUnavailable."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists. Raises StorageUnavailable."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (a missing key is no error). Raises StorageUnavailable."""

    @abc.abstractmethod
    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL anyone holding it can GET for ``expires_s`` seconds (no network call)."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StorageUnavailable unless the bucket is reachable."""


@dataclass(frozen=True)
class S3Config:
    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    # MinIO-like servers want path-style URLs (http://host/bucket/key).
    path_style: bool = True
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3


class S3ObjectStore(ObjectStore):
    """boto3 against any S3-compatible endpoint (AWS, MinIO, R2, Ceph, moto)."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            config=Config(
                # with a custom endpoint boto3 may presign SigV2 URLs; SigV4 works everywhere.
                signature_version="s3v4",
                s3={"addressing_style": "path" if config.path_style else "virtual"},
                connect_timeout=config.connect_timeout_s,
                read_timeout=config.read_timeout_s,
                retries={"max_attempts": config.max_attempts, "mode": "standard"},
            ),
        )

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        digest = hashlib.sha256(data).hexdigest()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                Metadata={"sha256": digest},
            )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StorageUnavailable(f"put {key!r} failed: {type(exc).__name__}") from exc
        return StoredObject(key=key, sha256=digest, size_bytes=len(data), content_type=content_type)

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return bytes(response["Body"].read())
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectNotFound(key) from exc
            raise StorageUnavailable(f"get {key!r} failed: {type(exc).__name__}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageUnavailable(f"get {key!r} failed: {type(exc).__name__}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
                return False
            raise StorageUnavailable(f"head {key!r} failed") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageUnavailable(f"head {key!r} failed") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StorageUnavailable(f"delete {key!r} failed: {type(exc).__name__}") from exc

    def presign_get(self, key: str, expires_s: int) -> str:
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s,
        ))

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StorageUnavailable(f"bucket {self.bucket!r} unreachable") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (local development and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            self.client.create_bucket(Bucket=self.bucket)


class InMemoryObjectStore(ObjectStore):
    """A dict of objects, for unit tests. ``down = True`` makes every call fail as unavailable."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.down = False
        self._lock = threading.Lock()

    def _up(self) -> None:
        if self.down:
            raise StorageUnavailable("in-memory store is down")

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        self._up()
        with self._lock:
            self.objects[key] = (bytes(data), content_type)
        return StoredObject(key, hashlib.sha256(data).hexdigest(), len(data), content_type)

    def get(self, key: str) -> bytes:
        self._up()
        with self._lock:
            if key not in self.objects:
                raise ObjectNotFound(key)
            return self.objects[key][0]

    def exists(self, key: str) -> bool:
        self._up()
        with self._lock:
            return key in self.objects

    def delete(self, key: str) -> None:
        self._up()
        with self._lock:
            self.objects.pop(key, None)

    def presign_get(self, key: str, expires_s: int) -> str:
        return f"memory://objects/{urllib.parse.quote(key)}?expires_s={expires_s}"

    def check(self) -> None:
        self._up()
