"""Listing a bucket by page and deleting objects in batches: what an object sweeper needs on a store
without lifecycle rules (``storage.lifecycle`` is the way where the store has them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from storage.store import S3ObjectStore, StorageUnavailable

DELETE_BATCH = 1000  # S3's DeleteObjects limit


@dataclass(frozen=True)
class ListedObject:
    key: str
    modified_at: float  # epoch seconds


def list_page(objects: S3ObjectStore, prefix: str, start_after: str | None = None,
              limit: int = 1000) -> list[ListedObject]:
    """Up to ``limit`` objects under ``prefix``, in key order, after ``start_after`` (None: from the start).

    Raises:
        StorageUnavailable: the bucket is unreachable.
    """
    params: dict[str, Any] = {"Bucket": objects.bucket, "Prefix": prefix, "MaxKeys": limit}
    if start_after:
        params["StartAfter"] = start_after
    try:
        answer = objects.client.list_objects_v2(**params)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise StorageUnavailable(f"list {prefix!r} failed: {type(exc).__name__}") from exc
    return [ListedObject(item["Key"], item["LastModified"].timestamp()) for item in answer.get("Contents", [])]


def delete_keys(objects: S3ObjectStore, keys: list[str]) -> int:
    """Delete ``keys`` (missing ones are no error), :data:`DELETE_BATCH` per request; how many went.

    Raises:
        StorageUnavailable: the bucket is unreachable or refused a delete.
    """
    deleted = 0
    for start in range(0, len(keys), DELETE_BATCH):
        batch = keys[start:start + DELETE_BATCH]
        try:
            answer = objects.client.delete_objects(
                Bucket=objects.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StorageUnavailable(f"delete of {len(batch)} object(s) failed: {type(exc).__name__}") from exc
        if errors := answer.get("Errors"):
            raise StorageUnavailable(f"delete refused for {len(errors)} object(s): {errors[0].get('Code')}")
        deleted += len(batch)
    return deleted
