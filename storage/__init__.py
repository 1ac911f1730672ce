"""The object store: images in and out of any S3-compatible endpoint. Imports nothing else of ours."""

from storage.store import (
    InMemoryObjectStore,
    ObjectNotFound,
    ObjectStore,
    S3Config,
    S3ObjectStore,
    StorageError,
    StorageUnavailable,
    StoredObject,
)

__all__ = [
    "InMemoryObjectStore",
    "ObjectNotFound",
    "ObjectStore",
    "S3Config",
    "S3ObjectStore",
    "StorageError",
    "StorageUnavailable",
    "StoredObject",
]
