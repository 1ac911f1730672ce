"""The Python SDK (editfarm_client) against the real API of a real local cluster.

Redis, SeaweedFS's S3 server, the API under uvicorn, a Celery render worker loading
the tiny Qwen-Image-Edit pipeline and the webhook worker are real processes
(:class:`cli.cluster.LocalCluster`); the SDK talks to them over HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from editfarm_client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    DoneEvent,
    Job,
    NotFound,
    Progress,
    ProgressEvent,
    StatusEvent,
    Unauthorized,
    UploadMode,
    verify_webhook,
)
from PIL import Image

from cli.cluster import LocalCluster
from cli.localservices import wait_until
from editfarm_testing.webhooks import ByJob, WebhookReceiver
from tests.e2e_support import TENANTS, png_bytes, rendered_by

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    """The session's ordinary cluster (tests/conftest.py)."""
    return shared_cluster


@pytest.fixture(scope="module")
def hooks() -> Iterator[ByJob]:
    with WebhookReceiver() as receiver:
        yield ByJob(receiver)


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.api_url, TENANTS["acme"], timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def edited(client: Client, hooks: ByJob, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """An edit submitted from a file path, with a webhook, waited for."""
    source = tmp_path_factory.mktemp("sdk-inputs") / "sample.png"
    source.write_bytes(png_bytes())
    job = client.edit(source, "make the sky purple", seed=7, steps=2, webhook=hooks.receiver.url)
    assert job.status == "queued" and job.id.startswith("job_") and job.created_at is not None
    return client.wait(job, timeout_s=180)


def test_an_edit_from_a_file_path_succeeds_and_downloads_with_its_sha256(
        client: Client, edited: Job, tmp_path: Path) -> None:
    done = edited.raise_for_status()
    assert done.succeeded and done.progress == Progress(step=2, total=2) and done.seed == 7
    assert done.started_at and done.finished_at and done.finished_at >= done.started_at
    [output] = done.outputs
    [path] = client.download(done, tmp_path / "out")
    data = path.read_bytes()
    assert path.parent == tmp_path / "out" and path.name == f"{done.id}_0.png"
    assert hashlib.sha256(data).hexdigest() == output.sha256 and len(data) == output.size_bytes
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (output.width, output.height)
    assert client.read_output(output) == data


def test_the_jobs_webhook_verifies_with_the_sdk(cluster: LocalCluster, edited: Job, hooks: ByJob) -> None:
    [delivery] = hooks.for_job(edited.id)
    message = verify_webhook(delivery.body, delivery.headers, cluster.webhook_secret)
    assert message.type == "job.succeeded" and message.job is not None
    assert message.job.id == edited.id and message.job.outputs[0].sha256 == edited.outputs[0].sha256


def test_an_edit_from_bytes_streams_status_progress_and_done(client: Client) -> None:
    job = client.edit(png_bytes((64, 64), (200, 60, 20)), "add a hat", seed=3, steps=4)
    events = list(client.stream(job))
    assert isinstance(events[0], StatusEvent) and events[0].job.id == job.id
    assert isinstance(events[-1], DoneEvent) and events[-1].job.succeeded
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert progress, events
    assert all(p.total == 4 for p in progress) and progress[-1].step == 4
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    final = events[-1].job
    assert final.outputs and final.params["seed"] == 3 and final.params["prompt"] == "add a hat"


def test_list_iterates_every_page_newest_first(client: Client, edited: Job) -> None:
    one_by_one = [job.id for job in client.list(page_size=1)]
    at_once = [job.id for job in client.list(page_size=100)]
    assert one_by_one == at_once and edited.id in at_once and len(at_once) >= 1
    page = client.list_page(limit=1)
    assert len(page.jobs) == 1 and (page.next_cursor is not None) == (len(at_once) > 1)
    succeeded = list(client.list(status="succeeded"))
    assert succeeded and all(job.status == "succeeded" for job in succeeded)
    assert [j.id for j in client.list(max_jobs=1)] == at_once[:1]


def test_cancel_then_a_second_cancel_is_a_conflict(client: Client) -> None:
    job = client.edit(png_bytes(), "never mind", seed=1, steps=100)
    canceled = client.cancel(job, reason="changed my mind")
    assert canceled.status == "canceled" and canceled.done
    assert canceled.error is not None and canceled.error.code == "canceled"
    assert "changed my mind" in canceled.error.message
    with pytest.raises(Conflict) as raised:
        client.cancel(job)
    assert raised.value.status_code == 409 and raised.value.code == "job_finished"


def test_an_unknown_job_is_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as raised:
        client.get("job_doesnotexist")
    assert raised.value.code == "not_found" and raised.value.status_code == 404


def test_a_wrong_key_is_unauthorized(cluster: LocalCluster) -> None:
    with Client(cluster.api_url, "wrong-key") as bad, pytest.raises(Unauthorized) as raised:
        bad.list_page()
    assert raised.value.code == "unauthorized" and raised.value.status_code == 401


@pytest.mark.parametrize("upload", ["auto", "json"])
def test_a_non_image_is_a_bad_request_with_the_api_code(cluster: LocalCluster, upload: UploadMode) -> None:
    with Client(cluster.api_url, TENANTS["acme"], upload=upload) as c, pytest.raises(BadRequest) as raised:
        c.edit(b"hello, not an image", "p", steps=2)
    assert raised.value.status_code == 422 and raised.value.code == "invalid_image"
    assert raised.value.message


def test_a_missing_field_names_its_param(client: Client) -> None:
    with pytest.raises(BadRequest) as raised:
        client.submit("edit", image=png_bytes(), steps=2)
    assert raised.value.code == "missing_field" and raised.value.param == "prompt"


def test_the_async_client_happy_path(cluster: LocalCluster, tmp_path: Path) -> None:
    async def main() -> tuple[Job, list[object], list[Path], list[str]]:
        async with AsyncClient(cluster.api_url, TENANTS["acme"], timeout_s=30) as c:
            job = await c.edit(png_bytes(), "paint it blue", seed=5, steps=2)
            events = [event async for event in c.stream(job)]
            done = await c.wait(job, timeout_s=180)
            paths = await c.download(done, tmp_path)
            listed = [j.id async for j in c.list(max_jobs=3)]
            return done, events, paths, listed

    done, events, paths, listed = asyncio.run(main())
    assert done.succeeded and isinstance(events[-1], DoneEvent)
    [path] = paths
    assert hashlib.sha256(path.read_bytes()).hexdigest() == done.outputs[0].sha256
    assert listed[0] == done.id


# -- models: a cluster of two pools and a model without workers (tests/conftest.py fleet_cluster) ---------


@pytest.fixture(scope="module")
def fleet(fleet_cluster: LocalCluster) -> Iterator[Client]:
    with Client(fleet_cluster.api_url, TENANTS["acme"], timeout_s=30) as c:
        yield c


def test_a_job_that_names_a_model_runs_on_it_and_one_that_names_none_on_the_default(
        fleet_cluster: LocalCluster, fleet: Client) -> None:
    named = fleet.inpaint(png_bytes(), "a hat", boxes=[(0.1, 0.1, 0.6, 0.6)], model="t2i", seed=1, steps=2)
    default = fleet.inpaint(png_bytes(), "a hat", boxes=[(0.1, 0.1, 0.6, 0.6)], seed=1, steps=2)
    assert (named.model, default.model) == ("t2i", "edit")  # edit is the catalog's default for inpaint
    for job, node in ((named, "render0-t2i@local"), (default, "render1-edit@local")):
        done = fleet.wait(job, timeout_s=120).raise_for_status()
        assert done.model == job.model and done.params["model"] == job.model
        assert rendered_by(fleet_cluster.redis_url, job.id) == node
    assert {j.id: j.model for j in fleet.list(max_jobs=5)}[named.id] == "t2i"


def test_an_unknown_model_and_one_not_serving_the_operation_are_bad_requests(fleet: Client) -> None:
    with pytest.raises(BadRequest) as unknown:
        fleet.generate("a lighthouse", model="qwen-image-9000", steps=2)
    assert unknown.value.status_code == 422 and unknown.value.code == "unknown_model"
    assert unknown.value.param == "model" and "t2i" in unknown.value.message
    with pytest.raises(BadRequest) as unsupported:
        fleet.edit(png_bytes(), "a hat", model="t2i", steps=2)
    assert unsupported.value.code == "unsupported_operation" and unsupported.value.param == "model"


def test_models_lists_the_catalog_with_each_pools_live_state(fleet: Client) -> None:
    waiting = fleet.generate("a lighthouse", model="lightning", steps=2)  # no worker: it stays queued
    try:
        models = {m.name: m for m in fleet.models()}
        assert list(models) == ["t2i", "edit", "lightning"]  # catalog order
        t2i, edit, lightning = models["t2i"], models["edit"], models["lightning"]
        assert t2i.pipeline == "QwenImagePipeline" and t2i.operations == ["generate", "inpaint"]
        assert t2i.default_for == ["generate"] and edit.default_for == ["edit", "inpaint"]
        assert lightning.defaults["steps"] == 8 and lightning.default_for == [] and lightning.max_side_px is None
        assert t2i.serves("inpaint") and not t2i.serves("edit")
        assert t2i.state.workers_ready == edit.state.workers_ready == 1
        assert lightning.state.workers_ready == 0 and lightning.state.queued >= 1
        assert waiting.model == "lightning" and fleet.get(waiting).status == "queued"
    finally:
        fleet.cancel(waiting)
    done = fleet.wait(fleet.generate("a lighthouse", steps=2), timeout_s=120).raise_for_status()
    assert done.model == "t2i"
    wait_until(lambda: next(m for m in fleet.models() if m.name == "t2i").state.median_render_s is not None,
               30, "the median render time of t2i", interval_s=0.2)


def test_the_async_client_names_a_model_and_lists_the_models(fleet_cluster: LocalCluster) -> None:
    async def main() -> tuple[Job, list[str]]:
        async with AsyncClient(fleet_cluster.api_url, TENANTS["acme"], timeout_s=30) as c:
            job = await c.submit("inpaint", model="t2i", image=png_bytes(), prompt="p",
                                 boxes=[(0.2, 0.2, 0.8, 0.8)], steps=2)
            names = [m.name for m in await c.models()]
            return await c.wait(job, timeout_s=120), names

    done, names = asyncio.run(main())
    assert done.succeeded and done.model == "t2i"
    assert names == ["t2i", "edit", "lightning"]
