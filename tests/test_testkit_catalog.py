"""The suites' two-model catalog (editfarm_testing/catalog.py) is one the product accepts, routes as the
suites assume, and names no model with the one-model cluster's key names."""

from __future__ import annotations

from pathlib import Path

from broker import keys
from broker.catalog import load_catalog_file
from broker.schema import Operation
from editfarm_testing.catalog import (
    EDIT_MODEL,
    TEXT_TO_IMAGE_MODEL,
    CatalogModel,
    fleet_catalog,
    legacy_render_keys,
)


def test_every_operation_defaults_to_the_edit_model_and_the_text_to_image_model_serves_generate_only(
        tmp_path: Path) -> None:
    config = fleet_catalog(tmp_path, edit_source=tmp_path / "tiny-edit", edit_workers=2,
                           text_to_image_workers=1, extra=[CatalogModel(name="tiny", source="/x", workers=0)])
    catalog = load_catalog_file(config["models_file"])
    assert catalog.names == (EDIT_MODEL, TEXT_TO_IMAGE_MODEL, "tiny")
    defaults = {op: getattr(catalog.default_for(op), "name", None) for op in Operation}
    assert defaults == dict.fromkeys(Operation, EDIT_MODEL)
    assert catalog.get(TEXT_TO_IMAGE_MODEL).operations == (Operation.GENERATE,)
    assert catalog.get(TEXT_TO_IMAGE_MODEL).pipeline == "QwenImagePipeline"
    assert catalog.get(EDIT_MODEL).source == str(tmp_path / "tiny-edit")
    assert config["render_pools"] == {EDIT_MODEL: 2, TEXT_TO_IMAGE_MODEL: 1}  # no pool of 0 workers


def test_no_model_of_the_catalog_uses_the_one_model_key_names(tmp_path: Path) -> None:
    catalog = load_catalog_file(fleet_catalog(tmp_path, edit_source="/x")["models_file"])
    theirs = {keys.render_queue(p, m) for m in catalog.names for p in keys.RENDER_PRIORITIES}
    theirs |= {keys.queued(p, m) for m in catalog.names for p in keys.RENDER_PRIORITIES}
    theirs |= {keys.inflight(m) for m in catalog.names}
    assert keys.LEGACY_MODEL not in catalog.names
    assert not theirs & set(legacy_render_keys())
    assert set(legacy_render_keys()) == {"render.high", "render.normal", "render.low", "editfarm:queued:high",
                                         "editfarm:queued:normal", "editfarm:queued:low", "editfarm:inflight"}
