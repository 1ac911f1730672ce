"""The bucket's lifecycle rule that deletes jobs' objects (inputs, previews, outputs, archived records)
a number of days after they were written: S3 expires objects by their age, which for a job's objects
is within a render's length of the job's finished_at."""

from __future__ import annotations

from typing import Any

import botocore.exceptions

from storage.store import S3ObjectStore, StorageUnavailable

RULE_ID = "editfarm-object-retention"
PREFIX = "tenants/"


def retention_rule(days: int) -> dict[str, Any]:
    """The lifecycle rule expiring everything under ``tenants/`` after ``days``.

    Raises:
        ValueError: ``days`` is not positive.
    """
    if days <= 0:
        raise ValueError("an object retention is at least 1 day")
    return {"ID": RULE_ID, "Filter": {"Prefix": PREFIX}, "Status": "Enabled", "Expiration": {"Days": days}}


def current_rules(objects: S3ObjectStore) -> list[dict[str, Any]]:
    """The bucket's lifecycle rules (empty: none).

    Raises:
        StorageUnavailable: the bucket is unreachable.
    """
    try:
        answer = objects.client.get_bucket_lifecycle_configuration(Bucket=objects.bucket)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
            return []
        raise StorageUnavailable(f"bucket {objects.bucket!r}: lifecycle read failed") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageUnavailable(f"bucket {objects.bucket!r} unreachable") from exc
    return list(answer.get("Rules", []))


def apply_retention(objects: S3ObjectStore, days: int) -> list[dict[str, Any]]:
    """Write (or replace) our rule, keeping the bucket's other rules; returns the rules now set.

    Raises:
        ValueError: ``days`` is not positive.
        StorageUnavailable: the bucket is unreachable or refused the configuration.
    """
    rules = [r for r in current_rules(objects) if r.get("ID") != RULE_ID] + [retention_rule(days)]
    try:
        objects.client.put_bucket_lifecycle_configuration(Bucket=objects.bucket,
                                                          LifecycleConfiguration={"Rules": rules})
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise StorageUnavailable(f"bucket {objects.bucket!r}: lifecycle write failed") from exc
    return rules
