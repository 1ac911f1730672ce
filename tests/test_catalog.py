"""The model catalog (broker/catalog.py): every validation case, the one-model catalog of
EDITFARM_MODEL, the lookups, and the example catalog that ships in examples/."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from broker.catalog import (
    KNOWN_PIPELINES,
    PIPELINE_OPERATIONS,
    Catalog,
    CatalogError,
    ModelSpec,
    UnknownModel,
    load_catalog,
    load_catalog_file,
    parse_catalog,
)
from broker.schema import Operation

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "models.yaml"

TWO_MODELS = """
models:
  - name: qwen-image
    source: Qwen/Qwen-Image
    pipeline: QwenImagePipeline
    operations: [generate]
    defaults: {steps: 50, true_cfg_scale: 4.0}
  - name: qwen-image-edit
    source: Qwen/Qwen-Image-Edit
    pipeline: QwenImageEditPipeline
    operations: [edit, inpaint]
"""


def _write(tmp_path: Path, text: str, name: str = "models.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _problems(tmp_path: Path, text: str) -> str:
    """The error message of loading ``text`` from a file (it must fail)."""
    with pytest.raises(CatalogError) as info:
        load_catalog_file(_write(tmp_path, text))
    message = str(info.value)
    assert str(tmp_path / "models.yaml") in message  # every error names the file
    return message


def _entry(**fields: object) -> str:
    """A one-entry catalog: a valid edit model with ``fields`` changed (None: the key removed)."""
    entry: dict[str, object] = {"name": "m", "source": "Qwen/Qwen-Image-Edit", "pipeline": "QwenImageEditPipeline"}
    entry.update(fields)
    import yaml

    return yaml.safe_dump({"models": [{k: v for k, v in entry.items() if v is not None}]})


# -- a valid catalog ---------------------------------------------------------------------------


def test_a_valid_catalog_reads_every_field(tmp_path: Path) -> None:
    catalog = load_catalog_file(_write(tmp_path, """
        models:
          - name: qwen-image-lightning
            source: Qwen/Qwen-Image
            pipeline: QwenImagePipeline
            operations: [generate, upscale]
            defaults:
              steps: 8
              true_cfg_scale: 1
              scheduler: {base_shift: 1.0986, shift_terminal: null, use_dynamic_shifting: true}
            fuse_loras:
              - {uri: hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.1.safetensors}
              - {uri: s3://loras/style.safetensors, scale: -0.5}
            max_side_px: 1328
            default_for: [generate]
            profile: fp8-storage+offload-text-encoder
        """))
    spec = catalog.get("qwen-image-lightning")
    assert spec.pipeline == "QwenImagePipeline" and spec.source == "Qwen/Qwen-Image"
    assert spec.operations == (Operation.GENERATE, Operation.UPSCALE)
    assert spec.defaults.steps == 8 and spec.defaults.true_cfg_scale == 1.0
    assert isinstance(spec.defaults.true_cfg_scale, float)
    assert dict(spec.defaults.scheduler) == {"base_shift": 1.0986, "shift_terminal": None,
                                             "use_dynamic_shifting": True}
    assert [(lora.uri, lora.scale) for lora in spec.fuse_loras] == [
        ("hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-8steps-V1.1.safetensors", 1.0),
        ("s3://loras/style.safetensors", -0.5),
    ]
    assert spec.max_side_px == 1328 and spec.profile == "fp8-storage+offload-text-encoder"
    assert catalog.default_for("generate") is spec and catalog.default_for(Operation.UPSCALE) is spec
    assert catalog.default_for("edit") is None  # nobody serves it: such jobs are refused
    assert catalog.origin == str(tmp_path / "models.yaml")


def test_lookups_names_get_default_for_and_serving() -> None:
    catalog = parse_catalog(TWO_MODELS, origin="two.yaml")
    assert catalog.names == ("qwen-image", "qwen-image-edit")
    assert len(catalog) == 2 and "qwen-image" in catalog and "nope" not in catalog
    assert catalog.get("qwen-image-edit").serves("inpaint")
    assert not catalog.get("qwen-image").serves(Operation.EDIT)
    # one model serves each: it is the default without a default_for
    assert catalog.default_for("generate").name == "qwen-image"  # type: ignore[union-attr]
    assert catalog.default_for("edit").name == "qwen-image-edit"  # type: ignore[union-attr]
    assert catalog.default_for("upscale") is None
    assert [s.name for s in catalog.serving("inpaint")] == ["qwen-image-edit"]
    assert catalog.to_dict()["defaults"] == {"edit": "qwen-image-edit", "generate": "qwen-image",
                                             "inpaint": "qwen-image-edit"}


def test_get_of_an_unknown_name_lists_the_valid_names() -> None:
    catalog = parse_catalog(TWO_MODELS, origin="two.yaml")
    with pytest.raises(UnknownModel) as info:
        catalog.get("qwen-image-edit-2509")
    assert info.value.valid_names == ("qwen-image", "qwen-image-edit")
    assert "qwen-image, qwen-image-edit" in str(info.value)


def test_operations_default_to_everything_the_pipeline_serves() -> None:
    catalog = parse_catalog(_entry(pipeline="QwenImagePipeline"), origin="x")
    assert set(catalog.get("m").operations) == set(PIPELINE_OPERATIONS["QwenImagePipeline"])
    assert Operation.EDIT not in catalog.get("m").operations


def test_declared_defaults_resolve_an_operation_several_models_serve() -> None:
    catalog = parse_catalog("""
models:
  - {name: edit, source: a, pipeline: QwenImageEditPipeline, operations: [edit], default_for: [edit]}
  - {name: edit-2509, source: b, pipeline: QwenImageEditPlusPipeline, operations: [edit]}
""", origin="x")
    assert catalog.default_for("edit").name == "edit"  # type: ignore[union-attr]
    assert [s.name for s in catalog.serving("edit")] == ["edit", "edit-2509"]


def test_relative_sources_and_lora_paths_resolve_against_the_catalog_folder(tmp_path: Path) -> None:
    path = _write(tmp_path, _entry(source="./models/tiny-edit", fuse_loras=[{"uri": "../loras/fast.safetensors"}]))
    spec = load_catalog_file(path).get("m")
    assert spec.source == str(tmp_path / "models" / "tiny-edit")
    assert spec.fuse_loras[0].uri == str(tmp_path.parent / "loras" / "fast.safetensors")
    # absolute folders and hub ids are kept as written
    assert load_catalog_file(_write(tmp_path, _entry(source="/models/qie"))).get("m").source == "/models/qie"


def test_every_known_pipeline_serves_a_non_empty_set_and_only_qwen_image_classes_are_known() -> None:
    assert set(KNOWN_PIPELINES) >= {"QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline",
                                    "QwenImage21Pipeline"}
    for name, operations in PIPELINE_OPERATIONS.items():
        assert name.startswith("QwenImage") and name.endswith("Pipeline") and operations


def test_every_known_pipeline_exists_in_the_installed_diffusers() -> None:
    # broker never imports diffusers; the worker checks the class at load. This keeps the list honest.
    import diffusers

    assert [name for name in KNOWN_PIPELINES if not hasattr(diffusers, name)] == []


def test_the_catalog_module_imports_neither_diffusers_nor_torch() -> None:
    probe = ("import sys, broker.catalog\n"
             "assert not {'diffusers', 'torch', 'transformers'} & set(sys.modules), 'imported'\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr


# -- EDITFARM_MODEL alone and the settings rules -----------------------------------------------


def test_editfarm_model_alone_is_a_one_model_catalog_serving_everything() -> None:
    catalog = load_catalog(model="/models/qie")
    assert catalog.names == ("default",)
    spec = catalog.get("default")
    assert spec.source == "/models/qie" and spec.pipeline == "QwenImageEditPipeline"
    assert spec.operations == tuple(Operation)
    for op in Operation:
        assert catalog.default_for(op) is spec


def test_the_file_wins_when_only_it_is_set(tmp_path: Path) -> None:
    path = _write(tmp_path, TWO_MODELS)
    assert load_catalog(models_file=str(path)).names == ("qwen-image", "qwen-image-edit")


def test_both_or_neither_setting_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, TWO_MODELS)
    with pytest.raises(CatalogError, match="both set"):
        load_catalog(models_file=str(path), model="/models/qie")
    with pytest.raises(CatalogError, match="no model configured"):
        load_catalog()


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(CatalogError) as info:
        load_catalog(models_file=str(missing))
    assert str(missing) in str(info.value) and "cannot read" in str(info.value)


# -- every validation case: the message names the file, the entry and the reason ---------------


def test_an_unknown_pipeline_class(tmp_path: Path) -> None:
    message = _problems(tmp_path, _entry(pipeline="StableDiffusionPipeline"))
    assert "entry 1 ('m')" in message and "unknown pipeline 'StableDiffusionPipeline'" in message
    assert "QwenImageEditPipeline" in message  # the valid ones are listed


def test_a_duplicate_name(tmp_path: Path) -> None:
    message = _problems(tmp_path, """
        models:
          - {name: edit, source: a, pipeline: QwenImageEditPipeline, operations: [edit]}
          - {name: gen, source: b, pipeline: QwenImagePipeline, operations: [generate]}
          - {name: edit, source: c, pipeline: QwenImageEditPlusPipeline, operations: [inpaint]}
        """)
    assert "entry 3 ('edit')" in message and "already used by entry 1" in message


def test_two_defaults_for_one_operation(tmp_path: Path) -> None:
    message = _problems(tmp_path, """
        models:
          - {name: edit, source: a, pipeline: QwenImageEditPipeline, default_for: [edit, inpaint]}
          - {name: edit-2509, source: b, pipeline: QwenImageEditPlusPipeline, default_for: [edit]}
        """)
    assert "entry 2 ('edit-2509')" in message and "'edit'" in message
    assert "entry 1 ('edit') already is" in message


def test_an_operation_the_pipeline_cannot_serve(tmp_path: Path) -> None:
    message = _problems(tmp_path, _entry(name="qwen-image", pipeline="QwenImagePipeline",
                                         operations=["generate", "edit"]))
    assert "entry 1 ('qwen-image')" in message and "QwenImagePipeline cannot serve edit" in message
    message = _problems(tmp_path, _entry(pipeline="QwenImage21Pipeline", operations=["inpaint"]))
    assert "QwenImage21Pipeline cannot serve inpaint" in message


def test_several_models_serving_an_operation_with_no_default(tmp_path: Path) -> None:
    message = _problems(tmp_path, """
        models:
          - {name: edit, source: a, pipeline: QwenImageEditPipeline, operations: [edit]}
          - {name: edit-2509, source: b, pipeline: QwenImageEditPlusPipeline, operations: [edit]}
        """)
    assert "operation 'edit' is served by entry 1 ('edit'), entry 2 ('edit-2509')" in message
    assert "default_for" in message


def test_default_for_an_operation_the_model_does_not_serve(tmp_path: Path) -> None:
    message = _problems(tmp_path, _entry(operations=["edit"], default_for=["generate"]))
    assert "entry 1 ('m')" in message and "default_for names generate, which it does not serve" in message


@pytest.mark.parametrize(("fields", "reason"), [
    ({"name": None}, "name is required"),
    ({"source": None}, "source is required"),
    ({"pipeline": None}, "pipeline is required"),
    ({"name": "Qwen-Image"}, "is not a model name"),
    ({"name": "qwen-image-2.1"}, "no dots"),
    ({"name": "a" * 41}, "at most 40"),
    ({"name": 7}, "is not a model name"),
    ({"source": ["a"]}, "source must be"),
    ({"steps": 8}, "unknown key(s) steps"),
    ({"operations": []}, "operations must be a non-empty list"),
    ({"operations": ["paint"]}, "'paint', which is not an operation"),
    ({"operations": ["edit", "edit"]}, "names 'edit' twice"),
    ({"default_for": ["paint"]}, "default_for names 'paint'"),
    ({"defaults": {"steps": 1}}, "defaults.steps must be a whole number from 2 to 100"),
    ({"defaults": {"steps": 8.5}}, "defaults.steps"),
    ({"defaults": {"steps": True}}, "defaults.steps"),
    ({"defaults": {"true_cfg_scale": 0.5}}, "defaults.true_cfg_scale must be a number from 1 to 20"),
    ({"defaults": {"true_cfg_scale": "4"}}, "defaults.true_cfg_scale"),
    ({"defaults": {"true_cfg_scale": float("nan")}}, "defaults.true_cfg_scale"),
    ({"defaults": {"guidance": 1}}, "defaults: unknown key(s) guidance"),
    ({"defaults": {"scheduler": {"_class_name": "X"}}}, "is not a scheduler config key"),
    ({"defaults": {"scheduler": {"shift": [1, 2]}}}, "defaults.scheduler.shift must be"),
    ({"defaults": {"scheduler": "lightning"}}, "defaults.scheduler must be a mapping"),
    ({"defaults": [8]}, "defaults must be a mapping"),
    ({"fuse_loras": {"uri": "s3://b/x.safetensors"}}, "fuse_loras must be a list"),
    ({"fuse_loras": [{"uri": "s3://b/x.safetensors"}] * 5}, "at most 4"),
    ({"fuse_loras": [{"scale": 1.0}]}, "fuse_loras[1] must be a mapping with a uri"),
    ({"fuse_loras": [{"uri": "s3://b/x.bin"}]}, "must be a .safetensors file"),
    ({"fuse_loras": [{"uri": "ftp://h/x.safetensors"}]}, "a LoRA uri is s3://"),
    ({"fuse_loras": [{"uri": "hf://only-owner.safetensors"}]}, "hf://<owner>/<repo>/<path>"),
    ({"fuse_loras": [{"uri": "s3://b/x.safetensors", "scale": 5}]}, "fuse_loras[1].scale must be"),
    ({"fuse_loras": [{"uri": "s3://b/x.safetensors", "weight": 1}]}, "unknown key(s) weight"),
    ({"max_side_px": 1000}, "max_side_px must be a multiple of 16"),
    ({"max_side_px": 8192}, "max_side_px must be"),
    ({"max_side_px": "1024"}, "max_side_px must be"),
    ({"profile": "a b"}, "is not a profile name"),
])
def test_an_invalid_field_names_the_entry_and_the_reason(tmp_path: Path, fields: dict[str, object],
                                                         reason: str) -> None:
    message = _problems(tmp_path, _entry(**fields))
    assert "entry 1" in message and reason in message


def test_every_problem_of_the_file_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        load_catalog_file(_write(tmp_path, """
            models:
              - {name: a, source: x, pipeline: Nope}
              - {name: b, source: y, pipeline: QwenImagePipeline, operations: [edit]}
            """))
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith("entry 1 ('a')")
    assert info.value.problems[1].startswith("entry 2 ('b')")


def test_problems_across_entries_are_reported_with_those_of_an_invalid_entry(tmp_path: Path) -> None:
    message = _problems(tmp_path, """
        models:
          - {name: a, source: x, pipeline: QwenImageEditPipeline, default_for: [edit]}
          - {name: b, source: y, pipeline: QwenImageEditPipeline, profile: "not a profile"}
          - {name: a, source: z, pipeline: QwenImageEditPlusPipeline, default_for: [edit]}
        """)
    assert "entry 2 ('b')" in message and "profile" in message
    assert "entry 3 ('a'): the name 'a' is already used by entry 1" in message
    assert "entry 3 ('a'): it is the default for 'edit', which entry 1 ('a') already is" in message


@pytest.mark.parametrize(("text", "reason"), [
    ("models: [", "not valid YAML at line"),
    ("- a\n- b\n", "must be a mapping with a 'models' list"),
    ("models: []\n", "non-empty list"),
    ("models: {}\n", "non-empty list"),
    ("model:\n  - {name: a}\n", "unknown top-level key(s) model"),
    ("models:\n  - just-a-name\n", "entry 1: must be a mapping"),
    ("models:\n  - name: a\n    name: b\n    source: x\n    pipeline: QwenImagePipeline\n",
     "found the key 'name' twice"),
])
def test_a_malformed_file(tmp_path: Path, text: str, reason: str) -> None:
    assert reason in _problems(tmp_path, text)


def test_a_catalog_built_in_code_is_validated_too() -> None:
    spec = ModelSpec(name="a", source="x", pipeline="QwenImagePipeline", operations=(Operation.GENERATE,))
    with pytest.raises(CatalogError, match="already used"):
        Catalog([spec, spec], origin="code")
    with pytest.raises(CatalogError, match="lists no models"):
        Catalog([], origin="code")


# -- the shipped example -----------------------------------------------------------------------


def test_the_example_catalog_is_valid_and_covers_each_public_pipeline() -> None:
    catalog = load_catalog_file(EXAMPLE)
    assert {spec.pipeline for spec in catalog} >= {"QwenImagePipeline", "QwenImageEditPipeline",
                                                   "QwenImageEditPlusPipeline", "QwenImage21Pipeline"}
    for op in Operation:
        assert catalog.default_for(op) is not None, op  # every operation has a model
    assert any(spec.fuse_loras for spec in catalog)  # a distilled few-step variant
