"""The S3 object store against a real S3 server (SeaweedFS) over HTTP."""

from __future__ import annotations

import hashlib
import time
import urllib.parse
import uuid

import httpx
import pytest

from cli.localservices import ManagedProcess
from storage import InMemoryObjectStore, ObjectNotFound, S3Config, S3ObjectStore, StorageUnavailable


def test_put_then_get_returns_the_same_bytes_and_checksum(s3: S3ObjectStore) -> None:
    data = b"\x89PNG fake but bytes"
    stored = s3.put("tenants/acme/jobs/j1/outputs/0.png", data, "image/png")
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert s3.get(stored.key) == data
    assert s3.exists(stored.key)
    head = s3.client.head_object(Bucket=s3.bucket, Key=stored.key)
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["sha256"] == stored.sha256


def test_a_missing_key_raises_object_not_found(s3: S3ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        s3.get("nope")
    assert not s3.exists("nope")


def test_a_presigned_url_is_sigv4_with_the_expiry_and_downloads(s3: S3ObjectStore) -> None:
    s3.put("k/a.png", b"abc", "image/png")
    url = s3.presign_get("k/a.png", expires_s=900)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["900"]
    assert "/" + s3.bucket + "/k/a.png" in url  # path-style addressing
    assert httpx.get(url).content == b"abc"


def test_a_presigned_url_stops_working_after_its_expiry(s3: S3ObjectStore) -> None:
    # moto never checked this; a real server must refuse the URL once X-Amz-Expires has passed
    s3.put("k/short.png", b"short-lived", "image/png")
    url = s3.presign_get("k/short.png", expires_s=2)
    first = httpx.get(url)
    assert first.status_code == 200 and first.content == b"short-lived"
    assert first.headers["content-type"] == "image/png"
    time.sleep(3.2)  # SigV4 expiry has one-second resolution
    late = httpx.get(url)
    assert late.status_code == 403
    assert b"short-lived" not in late.content


def test_a_presigned_url_with_a_tampered_key_or_signature_is_refused(s3: S3ObjectStore) -> None:
    s3.put("k/mine.png", b"mine", "image/png")
    s3.put("k/other.png", b"other", "image/png")
    url = s3.presign_get("k/mine.png", expires_s=60)
    assert httpx.get(url.replace("k/mine.png", "k/other.png")).status_code == 403
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Amz-Signature"][0]
    forged = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert httpx.get(forged).status_code == 403
    assert httpx.get(f"{s3.config.endpoint_url}/{s3.bucket}/k/mine.png").status_code == 403  # unsigned


def test_overwrite_delete_and_deleting_a_missing_key(s3: S3ObjectStore) -> None:
    s3.put("k/o.png", b"one", "image/png")
    s3.put("k/o.png", b"two", "image/webp")
    assert s3.get("k/o.png") == b"two"
    assert s3.client.head_object(Bucket=s3.bucket, Key="k/o.png")["ContentType"] == "image/webp"
    s3.delete("k/o.png")
    assert not s3.exists("k/o.png")
    with pytest.raises(ObjectNotFound):
        s3.get("k/o.png")
    s3.delete("k/o.png")  # a missing key is no error
    s3.delete("never/was.png")


def test_wrong_credentials_and_a_missing_bucket_are_storage_unavailable(s3: S3ObjectStore,
                                                                        s3_server: ManagedProcess) -> None:
    s3.put("k/c.png", b"c", "image/png")
    wrong = S3ObjectStore(S3Config(bucket=s3.bucket, endpoint_url=s3_server.url, access_key_id="test",
                                   secret_access_key="not-the-secret", max_attempts=1))
    with pytest.raises(StorageUnavailable):
        wrong.get("k/c.png")
    with pytest.raises(StorageUnavailable):
        wrong.put("k/c.png", b"x", "image/png")
    assert s3.get("k/c.png") == b"c"
    missing = S3ObjectStore(S3Config(bucket=f"none-{uuid.uuid4().hex[:8]}", endpoint_url=s3_server.url,
                                     access_key_id="test", secret_access_key="test", max_attempts=1))
    with pytest.raises(StorageUnavailable):
        missing.check()
    with pytest.raises(StorageUnavailable):  # not created on the fly, as AWS would not
        missing.put("k/c.png", b"c", "image/png")


def test_an_unreachable_endpoint_is_storage_unavailable() -> None:
    from cli.localservices import free_port

    store = S3ObjectStore(S3Config(bucket="x", endpoint_url=f"http://127.0.0.1:{free_port()}",
                                   access_key_id="t", secret_access_key="t", max_attempts=1,
                                   connect_timeout_s=0.5))
    with pytest.raises(StorageUnavailable):
        store.put("k", b"1", "image/png")
    with pytest.raises(StorageUnavailable):
        store.check()


def test_the_in_memory_store_behaves_like_s3() -> None:
    store = InMemoryObjectStore()
    stored = store.put("a", b"xyz", "image/png")
    assert store.get("a") == b"xyz" and stored.size_bytes == 3
    with pytest.raises(ObjectNotFound):
        store.get("b")
    store.down = True
    with pytest.raises(StorageUnavailable):
        store.get("a")
