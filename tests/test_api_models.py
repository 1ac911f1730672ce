"""The model field of POST /v1/jobs and GET /v1/models (in process over the test kit's fakes, and on
real Redis for the per-model queues and indexes)."""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.deps import Services
from broker import keys
from broker.catalog import parse_catalog
from broker.celery_app import render_job_id
from broker.fleet import MemoryFleet, RedisFleet
from broker.jobstore import RedisJobStore
from broker.schema import JobStatus, Priority
from editfarm_testing.api import TEST_KEYS, fake_services

pytestmark = pytest.mark.usefixtures("clean_env")

ACME = {"Authorization": f"Bearer {TEST_KEYS['acme']}"}


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = _png()

FLEET = """
models:
  - name: qwen-image
    source: /models/qwen-image
    pipeline: QwenImagePipeline
    operations: [generate, inpaint, outpaint, move, upscale]
    defaults: {steps: 12, true_cfg_scale: 2.5}
    max_side_px: 512
  - name: qwen-image-edit
    source: /models/qwen-image-edit
    pipeline: QwenImageEditPipeline
    operations: [edit, inpaint]
    default_for: [edit, inpaint]
    defaults: {steps: 40}
"""


def fleet_client(store: Any = None) -> tuple[TestClient, Services]:
    services = fake_services()
    services.catalog = parse_catalog(FLEET, origin="models.yaml")
    if store is not None:
        services.store = store
    return TestClient(create_app(services=services)), services


def submit(client: TestClient, **fields: Any) -> Any:
    body = {"operation": "edit", "prompt": "a hat", "image": IMAGE, **fields}
    if body["operation"] == "generate":
        body.pop("image")
    return client.post("/v1/jobs", json=body, headers=ACME)


def test_a_job_without_a_model_runs_on_the_catalogs_default_for_its_operation_with_its_defaults() -> None:
    client, _ = fleet_client()
    generate = submit(client, operation="generate")
    assert generate.status_code == 202, generate.text
    job = generate.json()
    assert job["model"] == job["params"]["model"] == "qwen-image"  # the only model serving generate
    assert (job["params"]["steps"], job["params"]["true_cfg_scale"]) == (12, 2.5)
    edit = submit(client).json()
    assert edit["model"] == "qwen-image-edit" and edit["params"]["steps"] == 40
    assert edit["params"]["true_cfg_scale"] == 4.0  # the model sets none: the API's own default


def test_what_a_job_sets_wins_over_its_models_defaults() -> None:
    client, _ = fleet_client()
    job = submit(client, operation="generate", steps=5, true_cfg_scale=1.0).json()
    assert (job["params"]["steps"], job["params"]["true_cfg_scale"]) == (5, 1.0)


def test_a_named_model_is_used_and_shown() -> None:
    client, _ = fleet_client()
    job = submit(client, operation="inpaint", model="qwen-image", boxes=[[0, 0, 0.5, 0.5]])
    assert job.status_code == 202, job.text
    assert job.json()["model"] == "qwen-image"
    assert client.get(job.json()["urls"]["self"], headers=ACME).json()["model"] == "qwen-image"


def test_an_unknown_model_is_422_unknown_model_listing_the_valid_names() -> None:
    client, services = fleet_client()
    answer = submit(client, model="qwen-image-edit-2509")
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "unknown_model" and error["param"] == "model"
    assert "qwen-image" in error["message"] and "qwen-image-edit" in error["message"]
    assert services.store.tenant_job_ids("acme") == []


def test_a_model_that_does_not_serve_the_operation_is_422_unsupported_operation() -> None:
    client, services = fleet_client()
    answer = submit(client, model="qwen-image")  # an edit on text-to-image weights
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "unsupported_operation" and error["param"] == "model"
    assert "qwen-image-edit" in error["message"]  # the model that does
    assert services.store.tenant_job_ids("acme") == []


def test_an_operation_no_model_serves_is_422_unsupported_operation() -> None:
    services = fake_services()
    services.catalog = parse_catalog("models: [{name: t2i, source: /m, pipeline: QwenImagePipeline, "
                                     "operations: [generate]}]", origin="models.yaml")
    client = TestClient(create_app(services=services))
    answer = submit(client)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "unsupported_operation"
    assert answer.json()["error"]["param"] == "operation"


def test_a_side_over_the_models_largest_is_422() -> None:
    client, _ = fleet_client()
    answer = submit(client, operation="generate", width=1024, height=512)
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == "width" and "512" in answer.json()["error"]["message"]


def test_without_a_catalog_every_job_runs_on_the_one_model_named_default() -> None:
    services = fake_services()
    client = TestClient(create_app(services=services))
    job = submit(client).json()
    assert job["model"] == "default"
    assert submit(client, model="other").json()["error"]["code"] == "unknown_model"


def test_get_models_lists_every_model_with_its_live_state() -> None:
    client, services = fleet_client()
    assert client.get("/v1/models").status_code == 401
    fleet = services.fleet
    assert isinstance(fleet, MemoryFleet)
    fleet.worker_seen("qwen-image-edit", "gpu0-qwen-image-edit@a", 30)
    fleet.worker_seen("qwen-image-edit", "gpu1-qwen-image-edit@a", -1)  # gone stale
    for seconds in (3.0, 1.0, 2.0):
        fleet.render_took("qwen-image-edit", seconds)
    submit(client)
    submit(client)
    running = submit(client).json()["id"]
    services.store.compare_and_set(running, {"status": [JobStatus.QUEUED]}, {"status": JobStatus.RUNNING})
    listing = client.get("/v1/models", headers=ACME)
    assert listing.status_code == 200
    body = listing.json()
    assert body["object"] == "list"
    by_name = {m["name"]: m for m in body["data"]}
    assert list(by_name) == ["qwen-image", "qwen-image-edit"]  # catalog order
    t2i, edit = by_name["qwen-image"], by_name["qwen-image-edit"]
    assert t2i["pipeline"] == "QwenImagePipeline" and t2i["operations"][0] == "generate"
    assert t2i["default_for"] == ["generate", "outpaint", "move", "upscale"]
    assert t2i["defaults"] == {"steps": 12, "true_cfg_scale": 2.5} and t2i["max_side_px"] == 512
    assert t2i["state"] == {"workers_ready": 0, "queued": 0, "running": 0, "median_render_s": None}
    assert edit["state"] == {"workers_ready": 1, "queued": 2, "running": 1, "median_render_s": 2.0}
    assert "source" not in t2i  # a folder on the workers is not the tenants' business


def test_on_redis_each_model_has_its_own_queues_and_indexes(redis_client: redis.Redis) -> None:
    client, services = fleet_client(RedisJobStore(redis_client))
    services.fleet = RedisFleet(redis_client)
    edit_high = submit(client, priority="high").json()
    edit_low = submit(client, priority="low").json()
    t2i = submit(client, operation="generate").json()
    assert t2i["queue_position"] == 0  # the edit model's jobs are not ahead of it
    assert edit_low["queue_position"] == 1
    assert [render_job_id(m) for m in redis_client.lrange("render.qwen-image-edit.high", 0, -1)] == [edit_high["id"]]
    assert [render_job_id(m) for m in redis_client.lrange("render.qwen-image-edit.low", 0, -1)] == [edit_low["id"]]
    assert [render_job_id(m) for m in redis_client.lrange("render.qwen-image.normal", 0, -1)] == [t2i["id"]]
    assert redis_client.llen("render.high") == redis_client.llen("render.normal") == 0
    assert redis_client.zrange(keys.queued("normal", "qwen-image"), 0, -1) == [t2i["id"].encode()]
    assert redis_client.zcard(keys.queued("normal")) == 0
    store = services.store
    assert store.queued_count(Priority.HIGH, "qwen-image-edit") == 1 and store.queued_count(Priority.HIGH) == 0
    # running: the model's own in-flight list (what its pool's KEDA scaler reads), then gone when it ends
    assert store.compare_and_set(t2i["id"], {"status": [JobStatus.QUEUED]},
                                 {"status": JobStatus.RUNNING, "lease_until": time.time() + 60})
    assert redis_client.lrange(keys.inflight("qwen-image"), 0, -1) == [t2i["id"].encode()]
    assert redis_client.llen(keys.INFLIGHT) == 0 and store.running_count("qwen-image") == 1
    assert redis_client.zcard(keys.queued("normal", "qwen-image")) == 0
    assert store.compare_and_set(t2i["id"], {"status": [JobStatus.RUNNING]}, {"status": JobStatus.SUCCEEDED,
                                                                               "finished_at": time.time()})
    assert redis_client.llen(keys.inflight("qwen-image")) == 0
    states = {m["name"]: m["state"] for m in client.get("/v1/models", headers=ACME).json()["data"]}
    assert states["qwen-image-edit"]["queued"] == 2 and states["qwen-image"]["queued"] == 0


def test_the_legacy_model_keeps_its_key_names() -> None:
    assert keys.render_queue("high", "default") == keys.render_queue("high") == "render.high"
    assert keys.queued("low", "default") == keys.queued("low") == "editfarm:queued:low"
    assert keys.inflight("default") == keys.INFLIGHT == "editfarm:inflight"
    assert keys.render_queue("high", "qwen-image") == "render.qwen-image.high"
    assert keys.inflight("qwen-image") == "editfarm:inflight:qwen-image"


def test_redis_fleet_counts_fresh_workers_and_the_median_of_the_last_renders(redis_client: redis.Redis) -> None:
    now = [1000.0]
    fleet = RedisFleet(redis_client, clock=lambda: now[0])
    fleet.worker_seen("m", "a", 30)
    fleet.worker_seen("m", "b", 5)
    assert fleet.workers("m") == 2 and fleet.workers("other") == 0
    now[0] += 10
    assert fleet.workers("m") == 1  # b missed its beats
    fleet.worker_gone("m", "a")
    assert fleet.workers("m") == 0
    assert fleet.median_render_s("m") is None
    for seconds in range(100):
        fleet.render_took("m", float(seconds))
    assert fleet.median_render_s("m") == 74.5  # the last 50: 50..99


def test_the_job_view_that_webhooks_carry_names_the_model() -> None:
    from broker.schema import Job, JobParams
    from broker.views import job_view

    named = Job(id="job_1", tenant="acme", params=JobParams(seed=1, prompt="p", model="qwen-image-edit"))
    legacy = Job(id="job_2", tenant="acme", params=JobParams(seed=1, prompt="p"))  # a record from before
    assert job_view(named, lambda key: key)["model"] == "qwen-image-edit"
    assert job_view(legacy, lambda key: key)["model"] == "default"
