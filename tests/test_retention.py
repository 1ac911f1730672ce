"""Retention: finished jobs leave Redis after their retention, on real Redis (and, for the archive,
the real S3 server); queued and running jobs never do."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.retention import clear_tenant_retention_cache
from broker import keys
from broker.jobstore import RedisJobStore
from broker.outbox import OutboxRecords
from broker.retention import DEFAULT_JOB_RETENTION_S, DELETED, NOT_DUE, NOT_TERMINAL, RetentionIndex
from broker.schema import Job, JobParams, JobStatus, Output, new_job_id
from broker.tenants import InMemoryTenantStore
from cli.localservices import ManagedProcess
from editfarm_testing.api import TEST_KEYS, fake_services, make_settings
from storage import S3ObjectStore
from workers.sweeper import RetentionSweeper

T0 = 1_900_000_000.0  # a fixed "now" for the records; the sweeper's clock is moved around it


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_job(tenant: str = "acme", retention_s: int | None = 5, created_at: float = T0) -> Job:
    return Job(id=new_job_id(), tenant=tenant, created_at=created_at,
               params=JobParams(prompt="a purple sky", seed=7, retention_s=retention_s))


def finish(store: RedisJobStore, job: Job, *, at: float = T0 + 10, outputs: list[Output] | None = None) -> Job:
    running = store.transition(job.id, JobStatus.RUNNING, {"started_at": at - 1, "lease_until": at + 60,
                                                           "worker": "w1", "attempts": 1})
    assert running is not None
    done = store.transition(job.id, JobStatus.SUCCEEDED, {"finished_at": at, "outputs": [o.model_dump() for o in outputs or []]},
                            from_=[JobStatus.RUNNING])
    assert done is not None
    return done


def mentions(client: redis.Redis, job_id: str) -> list[str]:
    """Every Redis key that is about the job or holds its id."""
    found = []
    for raw in client.scan_iter("*"):
        key = raw.decode()
        kind = client.type(key).decode()
        held = (job_id in key
                or (kind == "zset" and client.zscore(key, job_id) is not None)
                or (kind == "set" and client.sismember(key, job_id))
                or (kind == "list" and client.lpos(key, job_id) is not None))
        if held:
            found.append(key)
    return found


@pytest.fixture()
def store(redis_client: redis.Redis) -> RedisJobStore:
    return RedisJobStore(redis_client)


@pytest.fixture()
def index(redis_client: redis.Redis) -> RetentionIndex:
    return RetentionIndex(redis_client)


def test_a_finished_job_enters_the_expiry_index_at_finished_at_plus_its_retention(
        store: RedisJobStore, index: RetentionIndex) -> None:
    job = make_job(retention_s=5)
    store.create(job)
    assert index.expires_at(job.id) is None  # queued: not expirable
    finish(store, job, at=T0 + 10)
    assert index.expires_at(job.id) == pytest.approx(T0 + 15)


def test_a_record_without_retention_gets_the_default(store: RedisJobStore, index: RetentionIndex) -> None:
    job = make_job(retention_s=None)
    store.create(job)
    finish(store, job, at=T0)
    assert index.expires_at(job.id) == pytest.approx(T0 + DEFAULT_JOB_RETENTION_S)


def test_one_sweep_removes_every_key_of_a_finished_job(redis_client: redis.Redis, store: RedisJobStore,
                                                       index: RetentionIndex) -> None:
    job = make_job(retention_s=5)
    store.create(job)
    outbox = OutboxRecords(redis_client)
    outbox.put("msg-done", {"url": "https://example.invalid/h", "body": "{}", "tenant": "acme",
                            "state": "delivered", "attempts": "1"}, job_id=job.id)
    outbox.record_attempt("msg-done", {"attempt": 1, "at": T0, "status_code": 200})
    finish(store, job, at=T0 + 10)
    assert keys.job(job.id) in mentions(redis_client, job.id)
    assert redis_client.exists(keys.webhook_message("msg-done"), keys.webhook_attempts("msg-done")) == 2

    clock = Clock(T0 + 14)
    sweeper = RetentionSweeper(store=store, index=index, clock=clock)
    assert sweeper.sweep() == {"deleted": 0, "skipped": 0}  # 1 s before its retention ends
    assert store.get(job.id) is not None

    clock.now = T0 + 16
    assert sweeper.sweep() == {"deleted": 1, "skipped": 0}
    assert mentions(redis_client, job.id) == []
    assert redis_client.exists(keys.webhook_message("msg-done"), keys.webhook_attempts("msg-done")) == 0
    assert store.get(job.id) is None
    assert store.tenant_job_ids("acme") == []


def test_a_webhook_still_pending_delivery_keeps_its_own_ttl(redis_client: redis.Redis, store: RedisJobStore,
                                                            index: RetentionIndex) -> None:
    job = make_job(retention_s=5)
    store.create(job)
    OutboxRecords(redis_client).put("msg-pending", {"url": "https://example.invalid/h", "body": "{}",
                                                    "tenant": "acme", "state": "pending"}, job_id=job.id)
    finish(store, job, at=T0)
    assert RetentionSweeper(store=store, index=index, clock=Clock(T0 + 6)).sweep()["deleted"] == 1
    assert store.get(job.id) is None
    assert redis_client.exists(keys.webhook_message("msg-pending")) == 1
    assert redis_client.ttl(keys.webhook_message("msg-pending")) > 0


def test_queued_and_running_jobs_older_than_the_retention_are_untouched(
        redis_client: redis.Redis, store: RedisJobStore, index: RetentionIndex) -> None:
    queued = make_job(retention_s=5, created_at=T0 - 10_000)
    running = make_job(retention_s=5, created_at=T0 - 10_000)
    store.create(queued)
    store.create(running)
    assert store.transition(running.id, JobStatus.RUNNING, {"started_at": T0 - 9_000, "lease_until": T0 + 60,
                                                           "worker": "w1", "attempts": 1}) is not None
    result = RetentionSweeper(store=store, index=index, clock=Clock(T0 + 100_000)).sweep()
    assert result == {"deleted": 0, "skipped": 0}
    got_queued, got_running = store.get(queued.id), store.get(running.id)
    assert got_queued is not None and got_queued.status is JobStatus.QUEUED
    assert got_running is not None and got_running.status is JobStatus.RUNNING
    assert store.queue_position(queued.id) is not None
    assert redis_client.zscore(keys.RUNNING, running.id) is not None


def test_the_delete_script_refuses_a_job_that_is_no_longer_terminal(
        redis_client: redis.Redis, store: RedisJobStore, index: RetentionIndex) -> None:
    # a stale index entry (the race the script's own check closes): the job is queued again by now
    job = make_job(retention_s=5, created_at=T0 - 10_000)
    store.create(job)
    redis_client.zadd(keys.EXPIRY, {job.id: T0 - 5_000})
    assert index.due(T0) == [job.id]
    assert index.delete(job.id, T0) == NOT_TERMINAL
    got = store.get(job.id)
    assert got is not None and got.status is JobStatus.QUEUED
    assert store.queue_position(job.id) == 0
    assert index.expires_at(job.id) is None  # the stale entry is dropped


def test_the_delete_script_refuses_a_job_not_yet_due_and_reschedules_it(
        redis_client: redis.Redis, store: RedisJobStore, index: RetentionIndex) -> None:
    job = make_job(retention_s=500)
    store.create(job)
    finish(store, job, at=T0)
    redis_client.zadd(keys.EXPIRY, {job.id: T0 - 1})  # an index score earlier than the record says
    assert index.delete(job.id, T0 + 10) == NOT_DUE
    assert store.get(job.id) is not None
    assert index.expires_at(job.id) == pytest.approx(T0 + 500)
    assert index.delete(job.id, T0 + 501) == DELETED


def test_a_job_made_live_again_leaves_the_expiry_index(store: RedisJobStore, index: RetentionIndex) -> None:
    job = make_job(retention_s=5)
    store.create(job)
    finish(store, job, at=T0)
    # no transition leaves a terminal status today; a compare-and-set can, and any such change reindexes
    assert store.compare_and_set(job.id, {"status": [JobStatus.SUCCEEDED]}, {"status": JobStatus.QUEUED})
    assert index.expires_at(job.id) is None
    assert RetentionSweeper(store=store, index=index, clock=Clock(T0 + 100)).sweep()["deleted"] == 0


def test_a_sweep_reads_only_due_jobs_in_batches(store: RedisJobStore, index: RetentionIndex) -> None:
    due = [make_job(retention_s=5) for _ in range(7)]
    later = [make_job(retention_s=500) for _ in range(3)]
    for job in due + later:
        store.create(job)
        finish(store, job, at=T0)
    result = RetentionSweeper(store=store, index=index, batch=2, clock=Clock(T0 + 6)).sweep()
    assert result == {"deleted": 7, "skipped": 0}
    assert index.size() == 3
    assert all(store.get(j.id) is not None for j in later)


# -- the archive, on the real S3 server and through the API ----------------------------------------


def _without_urls(body: dict[str, Any]) -> dict[str, Any]:
    # a presigned URL carries its signing time: compare what it points at, not the signature
    return {**body, "outputs": [{**o, "url": o["url"].split("?")[0]} for o in body["outputs"]]}


def test_get_answers_from_the_archive_with_the_same_body(redis_client: redis.Redis, store: RedisJobStore,
                                                         index: RetentionIndex, s3: S3ObjectStore) -> None:
    settings = make_settings(archive_jobs=True)
    services = dataclasses.replace(fake_services(settings), store=store, objects=s3)
    client = TestClient(create_app(services=services))
    headers = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
    job = make_job(retention_s=5)
    store.create(job)
    output = s3.put(keys.output_object("acme", job.id, 0, "png"), b"\x89PNG fake", "image/png")
    finish(store, job, at=T0, outputs=[Output(key=output.key, content_type="image/png", width=64, height=64,
                                              sha256=output.sha256, size_bytes=output.size_bytes)])
    live = client.get(f"/v1/jobs/{job.id}", headers=headers)
    assert live.status_code == 200

    sweeper = RetentionSweeper(store=store, index=index, archive=s3, clock=Clock(T0 + 6))
    assert sweeper.sweep()["deleted"] == 1
    assert mentions(redis_client, job.id) == []
    assert s3.exists(keys.job_archive_object("acme", job.id))

    archived = client.get(f"/v1/jobs/{job.id}", headers=headers)
    assert archived.status_code == 200
    assert _without_urls(archived.json()) == _without_urls(live.json())
    assert archived.headers["cache-control"] == "no-store"
    # the list covers what is still in Redis, and says so
    listed = client.get("/v1/jobs", headers=headers).json()
    assert listed["data"] == [] and listed["next_cursor"] is None and listed["includes_archived"] is False
    # another tenant's archived job answers like an unknown one
    other = client.get(f"/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {TEST_KEYS['globex']}"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    # without the archive setting, a deleted job is simply gone
    plain = TestClient(create_app(services=dataclasses.replace(services, settings=make_settings())))
    assert plain.get(f"/v1/jobs/{job.id}", headers=headers).status_code == 404


def test_a_job_whose_objects_outlived_their_retention_says_data_removed() -> None:
    services = fake_services(make_settings(object_retention_days=1))
    client = TestClient(create_app(services=services))
    headers = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
    now = time.time()
    old, recent = make_job(created_at=now - 3 * 86400), make_job(created_at=now - 60)
    out = Output(key="tenants/acme/jobs/x/outputs/0.png", content_type="image/png", width=64, height=64,
                 sha256="0" * 64, size_bytes=10)
    for job, finished in ((old, now - 2 * 86400), (recent, now - 30)):
        services.store.create(job)
        services.store.transition(job.id, JobStatus.RUNNING, {"started_at": finished - 1})
        services.store.transition(job.id, JobStatus.SUCCEEDED, {"finished_at": finished, "outputs": [out.model_dump()]})
    gone = client.get(f"/v1/jobs/{old.id}", headers=headers).json()
    assert gone["data_removed"] is True and gone["outputs"][0]["url"] is None
    kept = client.get(f"/v1/jobs/{recent.id}", headers=headers).json()
    assert kept["data_removed"] is False and kept["outputs"][0]["url"]


# -- what a job may ask for ------------------------------------------------------------------------


def _submit(client: TestClient, **fields: Any) -> Any:
    body = {"operation": "generate", "prompt": "a purple sky", "width": 256, "height": 256, **fields}
    return client.post("/v1/jobs", json=body, headers={"Authorization": f"Bearer {TEST_KEYS['acme']}"})


def test_a_job_gets_its_tenants_retention_or_a_shorter_one_it_asks_for_never_a_longer_one() -> None:
    services = fake_services(make_settings(job_retention_s=3600))
    client = TestClient(create_app(services=services))
    assert _submit(client).json()["params"]["retention_s"] == 3600
    assert _submit(client, retention_s=60).json()["params"]["retention_s"] == 60
    longer = _submit(client, retention_s=3601)
    assert longer.status_code == 422
    assert longer.json()["error"]["code"] == "invalid_parameter"
    assert longer.json()["error"]["param"] == "retention_s"
    services.tenants.set_retention_s("acme", 600)
    clear_tenant_retention_cache()  # a change reaches an API process within TENANT_RETENTION_CACHE_S
    assert _submit(client).json()["params"]["retention_s"] == 600
    assert _submit(client, retention_s=601).status_code == 422
    assert _submit(client, retention_s=0).status_code == 422


# -- the bucket's lifecycle rule and the per-tenant setting, through the CLI --------------------------


def test_storage_lifecycle_apply_writes_the_expiration_rule_and_keeps_other_rules(
        s3: S3ObjectStore, s3_server: ManagedProcess) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from storage.lifecycle import RULE_ID, current_rules

    other = {"ID": "operator-rule", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 3}}
    s3.client.put_bucket_lifecycle_configuration(Bucket=s3.bucket, LifecycleConfiguration={"Rules": [other]})
    env = {"EDITFARM_S3_ENDPOINT_URL": s3_server.url, "EDITFARM_S3_BUCKET": s3.bucket,
           "EDITFARM_S3_ACCESS_KEY_ID": "test", "EDITFARM_S3_SECRET_ACCESS_KEY": "test",
           "EDITFARM_OBJECT_RETENTION_DAYS": "30"}
    runner = CliRunner()
    result = runner.invoke(app, ["storage", "lifecycle", "apply"], env=env)
    assert result.exit_code == 0, result.output
    rules = {r["ID"]: r for r in current_rules(s3)}
    assert rules[RULE_ID]["Expiration"] == {"Days": 30}
    assert rules[RULE_ID]["Filter"] == {"Prefix": "tenants/"}
    assert "operator-rule" in rules
    again = runner.invoke(app, ["storage", "lifecycle", "apply", "--days", "7"], env=env)
    assert again.exit_code == 0, again.output
    assert [r["Expiration"] for r in current_rules(s3) if r["ID"] == RULE_ID] == [{"Days": 7}]
    unset = runner.invoke(app, ["storage", "lifecycle", "apply"], env={**env, "EDITFARM_OBJECT_RETENTION_DAYS": "0"})
    assert unset.exit_code == 2


def test_a_tenants_retention_is_set_in_redis_and_read_back(redis_client: redis.Redis,
                                                          redis_server: ManagedProcess) -> None:
    from typer.testing import CliRunner

    from broker.tenants import RedisTenantStore
    from cli.main import app

    env = {"EDITFARM_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0"}
    runner = CliRunner()
    assert runner.invoke(app, ["retention", "set", "--tenant", "acme", "--seconds", "86400"], env=env).exit_code == 0
    assert RedisTenantStore(redis_client).retention_s("acme") == 86400
    assert runner.invoke(app, ["retention", "show", "--tenant", "acme"], env=env).output.strip() == "86400"
    assert runner.invoke(app, ["retention", "clear", "--tenant", "acme"], env=env).exit_code == 0
    assert RedisTenantStore(redis_client).retention_s("acme") is None


def test_a_job_waits_for_its_terminal_webhook_message_before_it_goes(
        redis_client: redis.Redis, store: RedisJobStore, index: RetentionIndex) -> None:
    from broker.retention import WEBHOOK_NOT_STORED
    from workers.webhooks import message_id_for

    job = Job(id=new_job_id(), tenant="acme", created_at=T0,
              params=JobParams(prompt="a purple sky", seed=7, retention_s=5, webhook="https://example.invalid/h"))
    store.create(job)
    finish(store, job, at=T0)
    # the notify task has not stored job.succeeded yet: the record it is built from stays
    assert index.delete(job.id, T0 + 6) == WEBHOOK_NOT_STORED
    assert store.get(job.id) is not None
    assert index.expires_at(job.id) == pytest.approx(T0 + 6 + 60)
    assert RetentionSweeper(store=store, index=index, clock=Clock(T0 + 7)).sweep()["deleted"] == 0
    OutboxRecords(redis_client).put(message_id_for(job.id, "job.succeeded"),
                                    {"url": "https://example.invalid/h", "body": "{}", "tenant": "acme",
                                     "state": "delivered"}, job_id=job.id)
    assert index.delete(job.id, T0 + 7) == DELETED
    assert mentions(redis_client, job.id) == []


def test_a_job_whose_webhook_never_came_goes_after_the_notify_grace(
        store: RedisJobStore, index: RetentionIndex) -> None:
    job = Job(id=new_job_id(), tenant="acme", created_at=T0,
              params=JobParams(prompt="a purple sky", seed=7, retention_s=5, webhook="https://example.invalid/h"))
    store.create(job)
    finish(store, job, at=T0)
    assert index.delete(job.id, T0 + 100, notify_grace_s=50) == DELETED


def test_backfill_indexes_finished_jobs_recorded_before_retention(
        redis_client: redis.Redis, store: RedisJobStore, index: RetentionIndex) -> None:
    old, queued = make_job(retention_s=None), make_job(retention_s=None)
    for job in (old, queued):
        store.create(job)
    finish(store, old, at=T0)
    redis_client.zrem(keys.EXPIRY, old.id)  # as a record from before the expiry index
    redis_client.sadd(keys.job_webhooks(old.id), "msg_x")  # not a job hash: skipped
    assert index.backfill(batch=1) == 1
    assert index.expires_at(old.id) == pytest.approx(T0 + DEFAULT_JOB_RETENTION_S)
    assert index.expires_at(queued.id) is None
    assert index.backfill() == 0  # again: nothing new


def test_the_sdk_says_data_removed_and_refuses_to_download_a_removed_output() -> None:
    from editfarm_client import Client, EditfarmError
    from editfarm_client.models import Job as SdkJob

    services = fake_services(make_settings(object_retention_days=1))
    client = TestClient(create_app(services=services))
    now = time.time()
    job = make_job(created_at=now - 3 * 86400)
    out = Output(key="tenants/acme/jobs/x/outputs/0.png", content_type="image/png", width=64, height=64,
                 sha256="0" * 64, size_bytes=10)
    services.store.create(job)
    services.store.transition(job.id, JobStatus.RUNNING, {"started_at": now - 2 * 86400 - 1})
    services.store.transition(job.id, JobStatus.SUCCEEDED, {"finished_at": now - 2 * 86400,
                                                            "outputs": [out.model_dump()]})
    headers = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}
    seen = SdkJob.from_dict(client.get(f"/v1/jobs/{job.id}", headers=headers).json())
    assert seen.data_removed is True and seen.outputs[0].url == ""
    with Client(base_url="http://127.0.0.1:9", api_key="k") as sdk, pytest.raises(EditfarmError, match="removed"):
        sdk.read_output(seen.outputs[0])


def test_a_tenant_store_that_is_down_answers_503_not_500() -> None:
    class DownTenants(InMemoryTenantStore):
        def retention_s(self, tenant: str) -> int | None:
            raise redis.ConnectionError("down")

    clear_tenant_retention_cache()
    services = dataclasses.replace(fake_services(), tenants=DownTenants())
    response = _submit(TestClient(create_app(services=services)))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert "ConnectionError" not in response.text
