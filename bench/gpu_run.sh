#!/usr/bin/env bash
# Device check: install the carried diffusers wheel, then the real-size benchmark.
set -uo pipefail
python3 -m pip install -q --no-deps .whl/diffusers-*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers; print(torch.__version__, transformers.__version__, diffusers.__version__)"
python3 bench/gpu_real_size.py --steps "${STEPS:-8,50}" --budget-s "${BUDGET_S:-380}" --only "${ONLY:-}" 2>&1 | grep -v -i "warn" | tail -60
