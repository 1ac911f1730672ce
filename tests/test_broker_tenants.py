"""API keys stored hashed and rotatable webhook secrets, on real Redis and the in-memory stand-in."""

from __future__ import annotations

import pytest
import redis

from broker.tenants import InMemoryTenantStore, RedisTenantStore, TenantStore, hash_key


@pytest.fixture(params=["redis", "memory"])
def tenants(request: pytest.FixtureRequest, redis_client: redis.Redis) -> TenantStore:
    return RedisTenantStore(redis_client) if request.param == "redis" else InMemoryTenantStore()


def test_a_created_key_authenticates_its_tenant_until_revoked(tenants: TenantStore) -> None:
    info, key = tenants.create_key("acme")
    assert key.startswith("ef_") and len(key) > 40
    assert tenants.tenant_for_key(key) == "acme"
    assert tenants.tenant_for_key(key + "x") is None
    assert tenants.revoke(info.key_id) and not tenants.revoke(info.key_id)
    assert tenants.tenant_for_key(key) is None


def test_keys_are_listed_without_the_key_and_stored_only_hashed(redis_client: redis.Redis) -> None:
    store = RedisTenantStore(redis_client)
    info, key = store.create_key("acme")
    store.create_key("globex")
    assert [i.key_id for i in store.list_keys("acme")] == [info.key_id]
    dump = b"".join(redis_client.dump(k) or b"" for k in redis_client.scan_iter("editfarm:*"))
    assert key.encode() not in dump
    assert hash_key(key).encode() in b"".join(redis_client.scan_iter("editfarm:apikey:*"))


def test_a_rotation_signs_with_both_secrets_during_the_overlap(tenants: TenantStore) -> None:
    first = tenants.rotate_webhook_secret("acme")
    assert tenants.signing_secrets("acme") == [first]
    second = tenants.rotate_webhook_secret("acme", overlap_s=60)
    assert tenants.signing_secrets("acme") == [second, first]
    later = tenants.webhook_secrets("acme")[1].expires_at
    assert later is not None
    assert tenants.signing_secrets("acme", now=later + 1) == [second]
    assert tenants.signing_secrets("globex") == []
