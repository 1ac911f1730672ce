"""Two pools of real tiny models (issue 14's acceptance): a text-to-image worker (``QwenImagePipeline``)
and an edit worker (``QwenImageEditPipeline``), each loaded from its own saved weights with
``from_pretrained``, behind the real API, Redis and SeaweedFS.

``generate`` runs on the first pool and ``edit`` on the second (the job records name the worker
nodes), and what each worker loaded is read from the worker process itself (its
``editfarm_model_info`` metric: the pipeline class and a fingerprint of the weights it holds),
compared with the saved folders loaded here: the text-to-image pool's weights are not the edit
model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.cluster import ClusterConfig, LocalCluster
from tests.e2e_support import API_KEYS, auth, data_url, png_bytes, rendered_by, wait_terminal
from workers.pipeline import load_renderer
from workers.pipeline.tiny import build_tiny_model

pytestmark = pytest.mark.integration

PIPELINES = {"t2i": "QwenImagePipeline", "edit": "QwenImageEditPipeline"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-models")
    return {name: build_tiny_model(root / name, pipeline=pipeline, seed=0) for name, pipeline in PIPELINES.items()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path]) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("fleet-models-cluster")
    catalog = workdir / "models.yaml"
    catalog.write_text(
        "models:\n"
        f"  - {{name: t2i, source: {folders['t2i']}, pipeline: QwenImagePipeline, operations: [generate]}}\n"
        f"  - {{name: edit, source: {folders['edit']}, pipeline: QwenImageEditPipeline, operations: [edit]}}\n")
    config = ClusterConfig(workdir=workdir, models_file=catalog, render_pools={"t2i": 1, "edit": 1},
                           api_keys=API_KEYS, extra_env={"EDITFARM_RENDERER": "diffusers"})
    with LocalCluster(config) as running:
        running.wait_ready(timeout_s=300)
        yield running


def loaded(cluster: LocalCluster, worker: str) -> dict[str, str]:
    """The labels of ``worker``'s editfarm_model_info, read from its own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_ports[worker]}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "editfarm_model_info":
            (sample,) = [s for s in family.samples if s.value == 1]
            return dict(sample.labels)
    raise AssertionError(f"{worker} reports no editfarm_model_info")


def identity_of(folder: Path, pipeline: str) -> dict[str, str]:
    return load_renderer(str(folder), "cpu", pipeline=pipeline).identity()


def submit(cluster: LocalCluster, body: dict[str, Any]) -> str:
    response = httpx.post(f"{cluster.api_url}/v1/jobs", json={"seed": 1, "steps": 2, "true_cfg_scale": 1.0, **body},
                          headers=auth(), timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_generate_and_edit_run_on_their_own_pools_with_their_own_weights(
        cluster: LocalCluster, folders: dict[str, Path]) -> None:
    generate = submit(cluster, {"operation": "generate", "prompt": "a red cube", "width": 64, "height": 64})
    edit = submit(cluster, {"operation": "edit", "prompt": "make it blue", "image": data_url(png_bytes())})
    for job_id, model in ((generate, "t2i"), (edit, "edit")):
        done = wait_terminal(cluster.api_url, job_id, timeout_s=300)
        assert done["status"] == "succeeded" and done["model"] == model, done
    assert rendered_by(cluster.redis_url, generate) == "render0-t2i@local"
    assert rendered_by(cluster.redis_url, edit) == "render1-edit@local"

    t2i, edit_model = loaded(cluster, "render0"), loaded(cluster, "render1")
    assert (t2i["model"], t2i["pipeline"]) == ("t2i", "QwenImagePipeline")
    assert (edit_model["model"], edit_model["pipeline"]) == ("edit", "QwenImageEditPipeline")
    expected = {name: identity_of(folder, PIPELINES[name])["weights"] for name, folder in folders.items()}
    assert t2i["weights"] == expected["t2i"] and edit_model["weights"] == expected["edit"]
    assert t2i["weights"] != edit_model["weights"]  # the text-to-image pool does not hold the edit model


def test_a_job_the_model_does_not_serve_is_refused_before_it_reaches_a_pool(cluster: LocalCluster) -> None:
    answer = httpx.post(f"{cluster.api_url}/v1/jobs", headers=auth(), timeout=30,
                        json={"operation": "edit", "model": "t2i", "prompt": "p", "image": data_url(png_bytes())})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "unsupported_operation"
