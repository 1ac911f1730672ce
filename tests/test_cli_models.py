"""`editfarm models check` and `editfarm model tiny --pipeline` (in process, through typer's runner)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner, Result

from cli.main import app

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "models.yaml"
# The runner's env= adds to os.environ: blank the catalog settings so the host's do not leak in.
NO_SETTINGS = {"EDITFARM_MODELS_FILE": "", "EDITFARM_MODEL": ""}


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env={**NO_SETTINGS, **(env or {})})


def test_check_prints_a_valid_catalog_and_its_default_per_operation() -> None:
    done = _run("models", "check", str(EXAMPLE))
    assert done.exit_code == 0, done.output
    assert f"{EXAMPLE}: valid, 7 models" in done.output
    assert "qwen-image-edit-2511\n  pipeline     QwenImageEditPlusPipeline" in done.output
    assert "  edit       qwen-image-edit-2511" in done.output


def test_check_json_is_the_catalog_as_data() -> None:
    done = _run("models", "check", str(EXAMPLE), "--json")
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["defaults"]["generate"] == "qwen-image-2512"
    lightning = next(m for m in data["models"] if m["name"] == "qwen-image-lightning")
    assert lightning["defaults"]["steps"] == 8 and lightning["fuse_loras"][0]["scale"] == 1.0


def test_check_of_an_invalid_catalog_prints_every_problem_and_exits_two(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n"
                   "  - {name: a, source: x, pipeline: QwenImagePipeline, operations: [edit]}\n"
                   "  - {name: a, source: y, pipeline: NoSuchPipeline}\n")
    done = _run("models", "check", str(bad))
    assert done.exit_code == 2
    assert str(bad) in done.stderr
    assert "entry 1 ('a'): QwenImagePipeline cannot serve edit" in done.stderr
    assert "entry 2 ('a'): unknown pipeline 'NoSuchPipeline'" in done.stderr
    assert done.stdout == ""


def test_check_without_a_file_reads_the_settings(tmp_path: Path) -> None:
    done = _run("models", "check", "--json", env={"EDITFARM_MODEL": "/models/qie"})
    assert done.exit_code == 0, done.output
    assert [m["name"] for m in json.loads(done.stdout)["models"]] == ["default"]
    done = _run("models", "check", env={"EDITFARM_MODELS_FILE": str(EXAMPLE)})
    assert done.exit_code == 0 and "7 models" in done.stdout
    done = _run("models", "check")
    assert done.exit_code == 2 and "no model configured" in done.stderr


def test_model_tiny_builds_the_pipeline_asked_for(tmp_path: Path) -> None:
    done = _run("model", "tiny", str(tmp_path / "t2i"), "--pipeline", "QwenImagePipeline", "--seed", "1")
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == str(tmp_path / "t2i")
    assert json.loads((tmp_path / "t2i" / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"


def test_model_tiny_builds_the_edit_model_by_default(tmp_path: Path) -> None:
    done = _run("model", "tiny", str(tmp_path / "edit"))
    assert done.exit_code == 0, done.output
    index = json.loads((tmp_path / "edit" / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"


def test_model_tiny_refuses_an_unknown_pipeline(tmp_path: Path) -> None:
    done = _run("model", "tiny", str(tmp_path / "x"), "--pipeline", "FluxPipeline")
    assert done.exit_code == 2 and "unknown pipeline 'FluxPipeline'" in done.stderr
    assert not (tmp_path / "x").exists()
