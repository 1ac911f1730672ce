"""GPU pinning for `editfarm worker --gpus`: one worker process per card, without touching CUDA here.

The parent must never initialise CUDA (it would not survive the fork of a
prefork pool), so GPUs are listed with `nvidia-smi`, not torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def list_gpus() -> list[str]:
    """Indices of the GPUs `nvidia-smi` sees. Raises RuntimeError if none can be listed."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise RuntimeError("--gpus all needs nvidia-smi; name the GPUs (--gpus 0,1) or use --gpus cpu")
    out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    gpus = [line.strip() for line in out.splitlines() if line.strip()]
    if not gpus:
        raise RuntimeError("nvidia-smi lists no GPUs")
    return gpus


def parse_gpus(spec: str) -> list[str] | None:
    """``all`` → every GPU, ``0,2`` → those, ``cpu`` → None (one CPU worker). Raises ValueError."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return None
    if spec == "all":
        return list_gpus()
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise ValueError(f"--gpus takes all, cpu or a list like 0,2; got {spec!r}")
    return gpus


def child_env(gpu: str, index: int, base: dict[str, str]) -> dict[str, str]:
    """The environment of the worker for one GPU: pinned card, own name, files and metrics port."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    env["EDITFARM_DEVICE"] = "cuda"
    for name, default in (("EDITFARM_READY_FILE", "/tmp/editfarm/ready"),
                          ("EDITFARM_HEARTBEAT_FILE", "/tmp/editfarm/heartbeat")):
        path = Path(base.get(name, default))
        env[name] = str(path.with_name(f"{path.name}-gpu{gpu}"))
    port = int(base.get("EDITFARM_METRICS_PORT", "0") or 0)
    if port:
        env["EDITFARM_METRICS_PORT"] = str(port + index)
    return env


def supervise(gpus: list[str], argv_for: list[str], *, model: str = "") -> int:
    """Run one `editfarm worker --gpus N [--model M]` per GPU and forward SIGTERM/SIGINT; returns the worst
    exit code.

    A child that dies is restarted after a short pause, unless we are stopping or it exited
    with ``EXIT_DOES_NOT_FIT`` (its profile does not fit its card: a restart would not either).
    """
    from workers.fitcheck import EXIT_DOES_NOT_FIT

    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def spawn(gpu: str, index: int) -> None:
        node = f"gpu{gpu}-{model}@%h" if model else f"gpu{gpu}@%h"
        model_args = ["--model", model] if model else []
        cmd = [sys.executable, "-m", "cli.main", "worker", "--gpus", gpu, *model_args, "--name", node, *argv_for]
        procs[gpu] = subprocess.Popen(cmd, env=child_env(gpu, index, dict(os.environ)))

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index, gpu in enumerate(gpus):
        spawn(gpu, index)
    worst = 0
    while procs:
        time.sleep(0.5)
        for index, gpu in enumerate(gpus):
            proc = procs.get(gpu)
            if proc is None or proc.poll() is None:
                continue
            worst = max(worst, proc.returncode or 0)
            del procs[gpu]
            if not stopping and proc.returncode != EXIT_DOES_NOT_FIT:
                time.sleep(2)
                spawn(gpu, index)
    return worst
