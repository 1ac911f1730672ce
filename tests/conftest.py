"""Shared fixtures: a private Redis server and S3 server for the whole test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.localservices import ManagedProcess, start_redis, start_s3
from storage import S3Config, S3ObjectStore

# Settings of the test process itself must not leak in from the developer's shell.
for name in list(os.environ):
    if name.startswith("EDITFARM_"):
        del os.environ[name]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``EDITFARM_`` setting for the test, whatever an earlier test or fixture left in the
    environment (restored afterwards). Modules that build settings from the environment use it:
    ``pytestmark = pytest.mark.usefixtures("clean_env")``."""
    for name in list(os.environ):
        if name.startswith("EDITFARM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    server = start_redis(workdir=tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture()
def redis_client(redis_server: ManagedProcess) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A real S3 server (SeaweedFS) on loopback, bucket ``editfarm``, credentials ``test``/``test``."""
    server = start_s3(workdir=tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture()
def s3(s3_server: ManagedProcess) -> S3ObjectStore:
    """An object store on the session's S3 server, in a bucket of its own (made empty)."""
    objects = S3ObjectStore(S3Config(bucket=f"b-{uuid.uuid4().hex[:8]}", endpoint_url=s3_server.url,
                                     access_key_id="test", secret_access_key="test"))
    objects.ensure_bucket()
    return objects


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Qwen-Image-Edit pipeline, built once per session."""
    from workers.pipeline.tiny import build_tiny_edit_model

    return build_tiny_edit_model(tmp_path_factory.mktemp("models") / "tiny-edit")


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[object]:
    """One ordinary local cluster (the e2e tenants) shared by the modules that need nothing special from
    it, so the suite starts it once. A fleet (editfarm_testing/catalog.py): one worker serves
    ``qwen-image-edit`` (the tiny model; every operation's default), ``qwen-image`` has none, so the SDK,
    CLI, UI and e2e suites run on per-model queues and indexes."""
    from cli.cluster import ClusterConfig, LocalCluster
    from editfarm_testing.catalog import fleet_catalog
    from tests.e2e_support import API_KEYS

    workdir = tmp_path_factory.mktemp("shared-cluster")
    config = ClusterConfig(workdir=workdir, api_keys=API_KEYS, **fleet_catalog(workdir, edit_source=tiny_model))
    with LocalCluster(config) as running:
        yield running


# A catalog of two served models and one without workers: inpaint is served by both pools (``edit`` is
# its default), generate by ``t2i`` (its default) and ``lightning``, which no worker serves.
FLEET_CATALOG = """
models:
  - name: t2i
    source: /nowhere/t2i              # the render stand-in loads nothing
    pipeline: QwenImagePipeline
    operations: [generate, inpaint]
    default_for: [generate]
  - name: edit
    source: /nowhere/edit
    pipeline: QwenImageEditPipeline
    operations: [edit, inpaint]
    default_for: [edit, inpaint]
  - name: lightning                   # no pool: its jobs wait, queued
    source: /nowhere/t2i
    pipeline: QwenImagePipeline
    operations: [generate]
    defaults: {steps: 8}
"""


@pytest.fixture(scope="session")
def fleet_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A cluster of :data:`FLEET_CATALOG` with one render worker for ``t2i`` (node ``render0-t2i@local``)
    and one for ``edit`` (``render1-edit@local``), rendering with the stand-in (no model, each job
    holds its worker a moment): shared by the clients' tests (SDK, CLI, web UI) of the model field."""
    from cli.cluster import ClusterConfig, LocalCluster
    from tests.e2e_support import API_KEYS

    workdir = tmp_path_factory.mktemp("fleet-cluster")
    catalog = workdir / "models.yaml"
    catalog.write_text(FLEET_CATALOG)
    config = ClusterConfig(workdir=workdir, models_file=catalog, render_pools={"t2i": 1, "edit": 1},
                           api_keys=API_KEYS,
                           extra_env={"EDITFARM_RENDERER": "standin", "EDITFARM_STANDIN_RENDER_S": "0.3"})
    with LocalCluster(config) as running:
        yield running
