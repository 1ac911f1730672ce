"""The model catalog: which Qwen-Image models a cluster serves, read and validated at start.

A fleet serves several models of the family side by side (text to image, instruction edit,
multi-image edit, 2.1, distilled few-step variants), each on its own workers. The catalog names
them; the API (which model a job asks for, and the default per operation) and the render workers
(what to load, with which defaults, LoRAs and memory profile) both read it, so it lives in the
contract. It is pure: it imports neither diffusers nor torch and touches no file besides the one
it reads. Whether a source exists, whether the installed diffusers has the class and whether a
profile or a scheduler key is known is checked by the worker that loads the model.

The file (``EDITFARM_MODELS_FILE``; see docs/models.md and examples/models.yaml)::

    models:
      - name: qwen-image-edit            # public id: lowercase letters, digits, hyphens
        source: Qwen/Qwen-Image-Edit     # hub id or folder (./ and ../ are relative to this file)
        pipeline: QwenImageEditPipeline
        operations: [edit, inpaint]      # default: every operation the pipeline serves
        defaults: {steps: 50, true_cfg_scale: 4.0, scheduler: {shift: 1.0}}
        fuse_loras: [{uri: hf://owner/repo/adapter.safetensors, scale: 1.0}]
        max_side_px: 1024
        default_for: [edit]
        profile: fp8-storage+offload-text-encoder

Without the file, ``EDITFARM_MODEL`` alone is a one-model catalog (:meth:`Catalog.single`): the
model named ``default``, loaded as a ``QwenImageEditPipeline``, serving and the default for every
operation, which is what a cluster did before the catalog existed.

Any problem stops the process at start with a :class:`CatalogError` naming the file, the entry
and the reason; every problem of the file is reported at once, not one per restart.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from broker.schema import (
    LORA_SUFFIX,
    MAX_CANVAS_SIDE,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MIN_SIDE,
    SIZE_MULTIPLE,
    JobParams,
    Operation,
    lora_location,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "KNOWN_PIPELINES",
    "PIPELINE_OPERATIONS",
    "Catalog",
    "CatalogError",
    "FusedLora",
    "ModelDefaults",
    "ModelSpec",
    "UnknownModel",
    "load_catalog",
    "load_catalog_file",
    "parse_catalog",
]

ALL_OPERATIONS: frozenset[Operation] = frozenset(Operation)
_MASK_OPERATIONS = frozenset({Operation.INPAINT, Operation.OUTPAINT, Operation.MOVE})

# What each Qwen-Image pipeline class can serve, as the worker runs it (workers/operations.py's
# primitives; inpaint, outpaint and move share the masked repaint, upscale is img2img by tiles):
#
# * QwenImagePipeline (text-to-image weights): generate, and the masked repaint and img2img of
#   the same components (diffusers' QwenImageInpaintPipeline/QwenImageImg2ImgPipeline are built
#   for these weights). No instruction edit: that needs the edit-trained transformer and the
#   vision processor, which a text-to-image checkpoint has neither of.
# * QwenImageEditPipeline, QwenImageEditPlusPipeline: everything. Their components are a superset
#   of the text-to-image ones, which is how a one-model cluster ran every operation until now
#   (the operations an entry lists are how an operator keeps, say, generate off edit weights).
#   Multi-image edits run the Plus pipeline.
# * QwenImageEditInpaintPipeline (edit weights, instruction-guided inpainting): the masked ones.
# * QwenImage21Pipeline: text to image and image-conditioned editing (one or several condition
#   images). It has its own VAE (16x) and transformer and no mask or strength input, so no
#   masked repaint and no img2img refinement.
PIPELINE_OPERATIONS: Mapping[str, frozenset[Operation]] = types.MappingProxyType({
    "QwenImagePipeline": ALL_OPERATIONS - {Operation.EDIT},
    "QwenImageEditPipeline": ALL_OPERATIONS,
    "QwenImageEditPlusPipeline": ALL_OPERATIONS,
    "QwenImageEditInpaintPipeline": _MASK_OPERATIONS,
    "QwenImage21Pipeline": frozenset({Operation.GENERATE, Operation.EDIT}),
})
KNOWN_PIPELINES: tuple[str, ...] = tuple(PIPELINE_OPERATIONS)

DEFAULT_MODEL_NAME = "default"
SINGLE_MODEL_PIPELINE = "QwenImageEditPipeline"

# A model name ends up in queue names (render.<model>.<priority>: no dots), Celery node names,
# Kubernetes object names and Prometheus labels: DNS-label characters, short enough to leave room
# for a prefix within Kubernetes' 63.
MAX_NAME_LENGTH = 40
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
# a memory profile is parts joined by "+" (workers/pipeline/profiles.py: fp8-storage+offload-text-encoder)
_PROFILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SCHEDULER_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HUB_LORA = re.compile(r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+/(?:[\w.-]+/)*[\w.-]+$")
MAX_SOURCE_LENGTH = 1024

_ENTRY_KEYS = ("name", "source", "pipeline", "operations", "defaults", "fuse_loras", "max_side_px",
               "default_for", "profile")
_REQUIRED_KEYS = ("name", "source", "pipeline")
_DEFAULTS_KEYS = ("steps", "true_cfg_scale", "scheduler")
_LORA_KEYS = ("uri", "scale")

Scalar = str | int | float | bool | None


def _bounds(field: str) -> tuple[float, float]:
    """The ``ge``/``le`` bounds of a ``JobParams`` field: a model's defaults obey the same limits
    as a job's own values, from one definition."""
    low = high = None
    for rule in JobParams.model_fields[field].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    assert low is not None and high is not None, field
    return low, high


STEPS_RANGE = _bounds("steps")
TRUE_CFG_RANGE = _bounds("true_cfg_scale")


class CatalogError(ValueError):
    """The catalog cannot be used: the process must not start.

    Attributes:
        origin: the file (or ``EDITFARM_MODEL``) the catalog came from.
        problems: one line per problem, each naming the entry and the reason.
    """

    def __init__(self, origin: str, problems: Sequence[str]) -> None:
        self.origin = origin
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            text = f"invalid model catalog {origin}: {self.problems[0]}"
        else:
            lines = "".join(f"\n  - {p}" for p in self.problems)
            text = f"invalid model catalog {origin}: {len(self.problems)} problems:{lines}"
        super().__init__(text)


class UnknownModel(LookupError):
    """No model of that name; ``valid_names`` lists the catalog's (for the API's 422)."""

    def __init__(self, name: str, valid_names: Sequence[str]) -> None:
        super().__init__(f"unknown model {name!r}; the models are {', '.join(valid_names)}")
        self.name = name
        self.valid_names = tuple(valid_names)


@dataclasses.dataclass(frozen=True)
class FusedLora:
    """A LoRA fused into the weights at load (e.g. a distilled few-step adapter).

    ``uri``: ``s3://bucket/key.safetensors``, ``https://…/x.safetensors``,
    ``hf://owner/repo/path/x.safetensors`` (a hub repository's file) or a local path.
    """

    uri: str
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """What a job of this model gets when it does not say.

    Attributes:
        steps, true_cfg_scale: None: the API's own defaults.
        scheduler: overrides of the model's scheduler config (``FlowMatchEulerDiscreteScheduler``
            keys such as ``shift`` or ``base_shift``), applied once at load.
    """

    steps: int | None = None
    true_cfg_scale: float | None = None
    scheduler: Mapping[str, Scalar] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One catalog entry, validated.

    Attributes:
        name: the public id jobs name it by.
        source: hub id or local folder handed to ``from_pretrained`` (relative folders resolved).
        pipeline: the diffusers class it is loaded as (one of ``KNOWN_PIPELINES``).
        operations: what it serves, in ``Operation`` order.
        defaults: per-model job defaults and scheduler overrides.
        fuse_loras: adapters fused at load, in order.
        max_side_px: the largest output side it renders; None: the operation's own limit.
        default_for: the operations for which it is the catalog's default (as written).
        profile: a memory profile name, checked by the worker; None: the worker's default.
    """

    name: str
    source: str
    pipeline: str
    operations: tuple[Operation, ...]
    defaults: ModelDefaults = ModelDefaults()
    fuse_loras: tuple[FusedLora, ...] = ()
    max_side_px: int | None = None
    default_for: tuple[Operation, ...] = ()
    profile: str | None = None

    def serves(self, operation: Operation | str) -> bool:
        """Whether jobs of ``operation`` may run on this model."""
        return Operation(operation) in self.operations

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``editfarm models check --json`` prints (and ``GET /v1/models`` will)."""
        return {
            "name": self.name,
            "source": self.source,
            "pipeline": self.pipeline,
            "operations": [op.value for op in self.operations],
            "defaults": {"steps": self.defaults.steps, "true_cfg_scale": self.defaults.true_cfg_scale,
                         "scheduler": dict(self.defaults.scheduler)},
            "fuse_loras": [{"uri": lora.uri, "scale": lora.scale} for lora in self.fuse_loras],
            "max_side_px": self.max_side_px,
            "default_for": [op.value for op in self.default_for],
            "profile": self.profile,
        }


def _label(position: int, name: object) -> str:
    """How a problem names an entry: ``entry 2 ('qwen-image')`` (1-based, as a person counts)."""
    return f"entry {position} ({name!r})" if isinstance(name, str) and name else f"entry {position}"


class Catalog:
    """The validated set of models, in file order, and the default model per operation.

    Constructing one checks what spans entries (duplicate names, two defaults for one operation,
    an operation served by several models with no default); :func:`parse_catalog` checks each
    entry first. Raises ``CatalogError``.
    """

    def __init__(self, models: Iterable[ModelSpec], *, origin: str) -> None:
        self.origin = origin
        self._models = tuple(models)
        problems: list[str] = []
        if not self._models:
            problems.append("it lists no models")
        positions = range(1, len(self._models) + 1)
        problems += _duplicate_names(self._models, positions)
        self._defaults, default_problems = _resolve_defaults(self._models, positions)
        problems += default_problems
        if problems:
            raise CatalogError(origin, problems)
        self._by_name = {spec.name: spec for spec in self._models}

    @classmethod
    def single(cls, source: str, *, name: str = DEFAULT_MODEL_NAME) -> Catalog:
        """The one-model catalog of ``EDITFARM_MODEL`` alone: ``source`` as a
        ``QwenImageEditPipeline`` serving, and the default for, every operation."""
        every = tuple(Operation)
        spec = ModelSpec(name=name, source=source, pipeline=SINGLE_MODEL_PIPELINE, operations=every,
                         default_for=every)
        return cls([spec], origin="EDITFARM_MODEL")

    @property
    def names(self) -> tuple[str, ...]:
        """Every model's name, in file order."""
        return tuple(spec.name for spec in self._models)

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return self._models

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> ModelSpec:
        """The model called ``name``. Raises ``UnknownModel`` (with the valid names) if none is."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownModel(name, self.names) from None

    def default_for(self, operation: Operation | str) -> ModelSpec | None:
        """The model a job of ``operation`` runs on when it names none; None when no model of the
        catalog serves the operation (such jobs are refused)."""
        return self._defaults.get(Operation(operation))

    def default_operations(self, name: str) -> tuple[Operation, ...]:
        """The operations whose jobs run on model ``name`` when they name none (as resolved: a model
        that alone serves an operation is its default without saying so)."""
        return tuple(op for op, spec in self._defaults.items() if spec.name == name)

    def serving(self, operation: Operation | str) -> tuple[ModelSpec, ...]:
        """Every model that serves ``operation``, in file order."""
        op = Operation(operation)
        return tuple(spec for spec in self._models if op in spec.operations)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the models and the resolved default per served operation."""
        return {
            "origin": self.origin,
            "models": [spec.to_dict() for spec in self._models],
            "defaults": {op.value: spec.name for op, spec in self._defaults.items()},
        }


def _duplicate_names(models: Sequence[ModelSpec], positions: Sequence[int]) -> list[str]:
    """A problem per entry whose name an earlier entry has (``positions``: each model's entry
    number in the file)."""
    first_with: dict[str, int] = {}
    problems: list[str] = []
    for position, spec in zip(positions, models, strict=True):
        if spec.name in first_with:
            problems.append(f"{_label(position, spec.name)}: the name {spec.name!r} is already used by "
                            f"entry {first_with[spec.name]}")
        else:
            first_with[spec.name] = position
    return problems


def _resolve_defaults(models: Sequence[ModelSpec], positions: Sequence[int], *, complete: bool = True
                      ) -> tuple[dict[Operation, ModelSpec], list[str]]:
    """The default model per operation, and the problems: an operation claimed twice in
    ``default_for``, or (``complete``: ``models`` is the whole catalog) served by several models
    of which none is declared its default (an operator must choose; picking the first would change
    with the file's order). An operation served by exactly one model defaults to it without a
    declaration. ``positions``: each model's entry number in the file."""
    defaults: dict[Operation, ModelSpec] = {}
    claimed_by: dict[Operation, tuple[int, str]] = {}
    problems: list[str] = []
    for position, spec in zip(positions, models, strict=True):
        for op in spec.default_for:
            if op in claimed_by:
                first = _label(*claimed_by[op])
                problems.append(f"{_label(position, spec.name)}: it is the default for {op.value!r}, which "
                                f"{first} already is; an operation has one default")
            else:
                claimed_by[op] = (position, spec.name)
                defaults[op] = spec
    for op in Operation:
        if op in defaults or not complete:
            continue
        serving = [(position, spec) for position, spec in zip(positions, models, strict=True)
                   if op in spec.operations]
        if len(serving) == 1:
            defaults[op] = serving[0][1]
        elif len(serving) > 1:
            listed = ", ".join(_label(position, spec.name) for position, spec in serving)
            problems.append(f"operation {op.value!r} is served by {listed} and none of them lists it in "
                            f"default_for; name one")
    return {op: defaults[op] for op in Operation if op in defaults}, problems


# -- parsing -----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no types
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so a repeated ``steps`` would hide the first)."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark)
        seen.add(key)
    return dict(loader.construct_mapping(node, deep=deep))


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def parse_catalog(text: str, *, origin: str, base_dir: Path | None = None) -> Catalog:
    """The catalog written in ``text`` (YAML). ``origin`` names it in errors; ``./`` and ``../``
    sources and LoRA paths are resolved against ``base_dir`` (None: left as written).

    Raises:
        CatalogError: the YAML does not parse, or any entry or the whole is invalid (all problems).
    """
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise CatalogError(origin, [f"not valid YAML{where}: {reason}"]) from None
    if not isinstance(document, dict):
        raise CatalogError(origin, ["the file must be a mapping with a 'models' list"])
    unknown = sorted(str(k) for k in document if k != "models")
    if unknown:
        raise CatalogError(origin, [f"unknown top-level key(s) {', '.join(unknown)}; only 'models' is read"])
    entries = document.get("models")
    if not isinstance(entries, list) or not entries:
        raise CatalogError(origin, ["'models' must be a non-empty list of model entries"])
    specs: list[ModelSpec] = []
    positions: list[int] = []
    problems: list[str] = []
    for position, raw in enumerate(entries, start=1):
        spec, entry_problems = _parse_entry(raw, position, base_dir)
        problems += entry_problems
        if spec is not None:
            specs.append(spec)
            positions.append(position)
    if problems:
        # Report what spans the valid entries too, except "no default" (an invalid entry may be
        # the one that declares it).
        problems += _duplicate_names(specs, positions)
        problems += _resolve_defaults(specs, positions, complete=False)[1]
        raise CatalogError(origin, problems)
    return Catalog(specs, origin=origin)


def load_catalog_file(path: str | Path) -> Catalog:
    """Read and validate the catalog file at ``path``.

    Raises:
        CatalogError: it cannot be read, or is invalid.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not readable as UTF-8 text"
        raise CatalogError(str(path), [f"cannot read it: {reason}"]) from None
    return parse_catalog(text, origin=str(path), base_dir=file.resolve().parent)


def load_catalog(*, models_file: str = "", model: str = "") -> Catalog:
    """The cluster's catalog from its settings (``EDITFARM_MODELS_FILE``, ``EDITFARM_MODEL``).

    The file when set; else the one-model catalog of ``model``. Both set is refused rather than
    one silently winning (a leftover ``EDITFARM_MODEL`` would otherwise look as if it counted).

    Raises:
        CatalogError: neither or both are set, or the file is invalid.
    """
    if models_file and model:
        raise CatalogError(models_file, ["EDITFARM_MODELS_FILE and EDITFARM_MODEL are both set; set one "
                                         "(the file names every model, EDITFARM_MODEL alone is a one-model "
                                         "catalog)"])
    if models_file:
        return load_catalog_file(models_file)
    if model:
        return Catalog.single(model)
    raise CatalogError("(none)", ["no model configured: set EDITFARM_MODELS_FILE (a catalog) or "
                                  "EDITFARM_MODEL (one model)"])


def _parse_entry(raw: object, position: int, base_dir: Path | None) -> tuple[ModelSpec | None, list[str]]:
    """One entry's spec (None if invalid) and its problems, each prefixed with the entry's label."""
    if not isinstance(raw, dict):
        return None, [f"{_label(position, None)}: must be a mapping with name, source and pipeline"]
    label = _label(position, raw.get("name"))
    problems: list[str] = []

    def problem(text: str) -> None:
        problems.append(f"{label}: {text}")

    unknown = sorted(str(k) for k in raw if k not in _ENTRY_KEYS)
    if unknown:
        problem(f"unknown key(s) {', '.join(unknown)}; an entry has {', '.join(_ENTRY_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in raw or raw[key] in (None, ""):
            problem(f"{key} is required")

    name = raw.get("name")
    if name not in (None, "") and not _valid_name(name):
        problem(f"name {name!r} is not a model name: lowercase letters, digits and inner hyphens, at most "
                f"{MAX_NAME_LENGTH} characters (no dots: it becomes part of queue names)")

    source = raw.get("source")
    if source not in (None, ""):
        if not isinstance(source, str) or len(source) > MAX_SOURCE_LENGTH or "\n" in source:
            problem(f"source must be a hub id or a folder path (text, at most {MAX_SOURCE_LENGTH} characters)")
            source = None
        else:
            source = _resolve_local(source, base_dir)

    pipeline = raw.get("pipeline")
    servable: frozenset[Operation] | None = None
    if pipeline not in (None, ""):
        if isinstance(pipeline, str) and pipeline in PIPELINE_OPERATIONS:
            servable = PIPELINE_OPERATIONS[pipeline]
        else:
            problem(f"unknown pipeline {pipeline!r}; the known Qwen-Image pipelines are "
                    f"{', '.join(KNOWN_PIPELINES)}")

    operations = _operations(raw, "operations", problem)
    if operations is not None and servable is not None:
        cannot = [op.value for op in operations if op not in servable]
        if cannot:
            problem(f"{pipeline} cannot serve {', '.join(cannot)}; it serves "
                    f"{', '.join(op.value for op in Operation if op in servable)}")
    if "operations" not in raw and servable is not None:
        operations = tuple(op for op in Operation if op in servable)

    default_for = _operations(raw, "default_for", problem, empty_ok=True) if "default_for" in raw else ()
    if default_for and operations is not None:
        outside = [op.value for op in default_for if op not in operations]
        if outside:
            problem(f"default_for names {', '.join(outside)}, which it does not serve")

    defaults = _defaults(raw.get("defaults"), problem)
    loras = _fuse_loras(raw.get("fuse_loras"), problem, base_dir)
    max_side = _max_side(raw.get("max_side_px"), problem)
    profile = raw.get("profile")
    if profile is not None and not (isinstance(profile, str) and _PROFILE.match(profile)):
        problem(f"profile {profile!r} is not a profile name (letters, digits, '.', '_', '-', '+')")
        profile = None

    if problems:
        return None, problems
    assert isinstance(name, str) and isinstance(source, str) and isinstance(pipeline, str)
    assert operations is not None and default_for is not None and defaults is not None and loras is not None
    return ModelSpec(name=name, source=source, pipeline=pipeline, operations=operations, defaults=defaults,
                     fuse_loras=loras, max_side_px=max_side, default_for=default_for, profile=profile), []


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and bool(_NAME.match(name))


def _resolve_local(path: str, base_dir: Path | None) -> str:
    """``./x`` and ``../x`` relative to the catalog's folder (so a catalog and its models move
    together); anything else as written (an absolute folder or a hub id)."""
    if base_dir is not None and (path.startswith("./") or path.startswith("../")):
        return str((base_dir / path).resolve())
    return path


def _operations(raw: dict[Any, Any], key: str, problem: Any, *, empty_ok: bool = False
                ) -> tuple[Operation, ...] | None:
    """The operations listed under ``key``, in ``Operation`` order; None (with a problem) if the
    list is malformed or names an unknown or repeated operation."""
    value = raw.get(key)
    if key not in raw:
        return None
    if isinstance(value, str):
        value = [value]
    known = ", ".join(op.value for op in Operation)
    if not isinstance(value, list) or (not value and not empty_ok):
        problem(f"{key} must be a {'' if empty_ok else 'non-empty '}list of operations ({known})")
        return None
    found: list[Operation] = []
    for item in value:
        try:
            op = Operation(item)
        except ValueError:
            problem(f"{key} names {item!r}, which is not an operation ({known})")
            return None
        if op in found:
            problem(f"{key} names {op.value!r} twice")
            return None
        found.append(op)
    return tuple(op for op in Operation if op in found)


def _number(value: object) -> float | None:
    """``value`` as a finite float if it is an int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _defaults(value: object, problem: Any) -> ModelDefaults | None:
    if value is None:
        return ModelDefaults()
    if not isinstance(value, dict):
        problem(f"defaults must be a mapping of {', '.join(_DEFAULTS_KEYS)}")
        return None
    ok = True
    unknown = sorted(str(k) for k in value if k not in _DEFAULTS_KEYS)
    if unknown:
        problem(f"defaults: unknown key(s) {', '.join(unknown)}; defaults has {', '.join(_DEFAULTS_KEYS)}")
        ok = False
    steps = value.get("steps")
    low, high = STEPS_RANGE
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not low <= steps <= high):
        problem(f"defaults.steps must be a whole number from {low:g} to {high:g}, not {steps!r}")
        ok = False
    cfg = value.get("true_cfg_scale")
    cfg_number = _number(cfg)
    low, high = TRUE_CFG_RANGE
    if cfg is not None and (cfg_number is None or not low <= cfg_number <= high):
        problem(f"defaults.true_cfg_scale must be a number from {low:g} to {high:g}, not {cfg!r}")
        ok = False
    scheduler = value.get("scheduler") or {}
    if not isinstance(scheduler, dict):
        problem("defaults.scheduler must be a mapping of scheduler config keys to values")
        return None
    for key, setting in scheduler.items():
        if not isinstance(key, str) or not _SCHEDULER_KEY.match(key):
            problem(f"defaults.scheduler: {key!r} is not a scheduler config key (lowercase, e.g. base_shift)")
            ok = False
        elif setting is not None and not isinstance(setting, str | bool) and _number(setting) is None:
            problem(f"defaults.scheduler.{key} must be a number, true/false, text or null, not {setting!r}")
            ok = False
    if not ok:
        return None
    return ModelDefaults(steps=steps, true_cfg_scale=cfg_number,
                         scheduler=types.MappingProxyType(dict(scheduler)))


def _fuse_loras(value: object, problem: Any, base_dir: Path | None) -> tuple[FusedLora, ...] | None:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        problem(f"fuse_loras must be a list of at most {MAX_LORAS} {{uri, scale}} mappings")
        return None
    loras: list[FusedLora] = []
    for index, item in enumerate(value, start=1):
        where = f"fuse_loras[{index}]"
        if not isinstance(item, dict) or "uri" not in item:
            problem(f"{where} must be a mapping with a uri (and a scale)")
            return None
        unknown = sorted(str(k) for k in item if k not in _LORA_KEYS)
        if unknown:
            problem(f"{where}: unknown key(s) {', '.join(unknown)}; a LoRA has uri and scale")
            return None
        uri = item["uri"]
        reason = _lora_uri_problem(uri)
        if reason:
            problem(f"{where}.uri {uri!r}: {reason}")
            return None
        scale = _number(item.get("scale", 1.0))
        if scale is None or abs(scale) > MAX_LORA_SCALE:
            problem(f"{where}.scale must be a number from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}, "
                    f"not {item.get('scale')!r}")
            return None
        loras.append(FusedLora(uri=_resolve_local(uri, base_dir), scale=scale))
    return tuple(loras)


def _lora_uri_problem(uri: object) -> str | None:
    """Why ``uri`` cannot name a LoRA to fuse, or None. The worker fetches it at load."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_SOURCE_LENGTH:
        return "a LoRA uri is text"
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("s3", "https", "http"):
        try:
            lora_location(uri)
        except ValueError as exc:
            return str(exc)
        return None
    if not uri.lower().endswith(LORA_SUFFIX):
        return f"a LoRA file must be a {LORA_SUFFIX} file"
    if scheme == "hf":
        return None if _HUB_LORA.match(uri) else "a hub LoRA is hf://<owner>/<repo>/<path>.safetensors"
    if scheme:
        return "a LoRA uri is s3://, https://, hf://<owner>/<repo>/<file> or a local path"
    return None


def _max_side(value: object, problem: Any) -> int | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int) or not MIN_SIDE <= value <= MAX_CANVAS_SIDE
            or value % SIZE_MULTIPLE):
        problem(f"max_side_px must be a multiple of {SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_CANVAS_SIDE}, "
                f"not {value!r}")
        return None
    return value
