"""An invalid catalog, or a model no catalog names, stops the API and the render worker at start with
the file, the entry and the reason (real processes: `editfarm api`, `editfarm worker`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.catalog import parse_catalog
from workers.serving import served_model
from workers.settings import WorkerSettings

pytestmark = pytest.mark.usefixtures("clean_env")

ROOT = Path(__file__).resolve().parents[1]
TWO = """
models:
  - {name: qwen-image, source: /m/t2i, pipeline: QwenImagePipeline, operations: [generate]}
  - {name: qwen-image-edit, source: /m/edit, pipeline: QwenImageEditPipeline, operations: [edit]}
"""
BROKEN = {
    "an unknown pipeline class": ("models:\n  - {name: a, source: /m, pipeline: FluxPipeline}\n",
                                  ["entry 1 ('a')", "FluxPipeline"]),
    "a duplicate name": ("models:\n  - {name: a, source: /m, pipeline: QwenImagePipeline, operations: [generate]}\n"
                         "  - {name: a, source: /n, pipeline: QwenImagePipeline, operations: [generate], "
                         "default_for: [generate]}\n", ["entry 2 ('a')", "already used by entry 1"]),
    "two defaults for one operation": (
        "models:\n  - {name: a, source: /m, pipeline: QwenImagePipeline, default_for: [generate]}\n"
        "  - {name: b, source: /n, pipeline: QwenImagePipeline, default_for: [generate]}\n", ["generate", "'b'"]),
}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDITFARM_")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_invalid_catalog_stops_the_api_and_the_worker_naming_the_entry(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    catalog = tmp_path / "models.yaml"
    catalog.write_text(text)
    env = {"EDITFARM_MODELS_FILE": str(catalog), "EDITFARM_REDIS_URL": "redis://127.0.0.1:1/0"}
    for args in (["api", "--port", "1"], ["worker", "--model", "a", "--gpus", "cpu"]):
        done = run(args, env)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        for words in (str(catalog), *expected):
            assert words in done.stderr, (args, words, done.stderr)


def test_a_worker_must_name_a_model_of_its_catalog(tmp_path: Path) -> None:
    catalog = tmp_path / "models.yaml"
    catalog.write_text(TWO)
    env = {"EDITFARM_MODELS_FILE": str(catalog), "EDITFARM_REDIS_URL": "redis://127.0.0.1:1/0"}
    unknown = run(["worker", "--model", "qwen-image-2512", "--gpus", "cpu"], env)
    assert unknown.returncode == 2 and "qwen-image-2512" in unknown.stderr and "qwen-image-edit" in unknown.stderr
    unnamed = run(["worker", "--gpus", "cpu"], env)
    assert unnamed.returncode == 2 and "--model" in unnamed.stderr


def test_the_served_model_picks_the_queues_and_the_catalog_entry(tmp_path: Path) -> None:
    catalog = tmp_path / "models.yaml"
    catalog.write_text(TWO)
    served = served_model(WorkerSettings(models_file=str(catalog), worker_model="qwen-image"))
    assert served.spec == parse_catalog(TWO, origin="x").get("qwen-image")
    assert served.queues == ("render.qwen-image.high", "render.qwen-image.normal", "render.qwen-image.low")
    one = served_model(WorkerSettings(model="/m/edit"))  # EDITFARM_MODEL alone
    assert one.name == "default" and one.queues == ("render.high", "render.normal", "render.low")
    assert one.spec is not None and one.spec.pipeline == "QwenImageEditPipeline"
    standin = served_model(WorkerSettings(renderer="standin", worker_model="m"))
    assert standin.name == "m" and standin.spec is None
