"""A GPU's total and free memory without CUDA: NVML (``pynvml`` from nvidia-ml-py) when it is
installed, else ``nvidia-smi``. Safe in the Celery prefork parent, which must never initialise
CUDA (the render children would inherit a broken context)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable

from workers.fitcheck import CardMemory

__all__ = ["parse_smi_line", "read_card_memory", "visible_card"]

log = logging.getLogger("editfarm.worker")
_MIB = 1024**2


def visible_card(environ: dict[str, str] | None = None) -> str:
    """The card this worker renders on as NVML/nvidia-smi name it: the first entry of
    ``CUDA_VISIBLE_DEVICES`` (an index or a UUID; `editfarm worker --gpus` pins one), else "0"."""
    env = os.environ if environ is None else environ
    first = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return first or "0"


def parse_smi_line(line: str) -> CardMemory:
    """One line of ``nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv,noheader,nounits``
    (MiB). Raises ValueError on anything else."""
    name, total, free = (part.strip() for part in line.rsplit(",", 2))
    return CardMemory(name=name, total_bytes=int(float(total)) * _MIB, free_bytes=int(float(free)) * _MIB)


def _from_nvml(card: str) -> CardMemory | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = (pynvml.nvmlDeviceGetHandleByUUID(card) if not card.isdigit()
                  else pynvml.nvmlDeviceGetHandleByIndex(int(card)))
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return CardMemory(name=name.decode() if isinstance(name, bytes) else str(name),
                          total_bytes=int(info.total), free_bytes=int(info.free))
    finally:
        pynvml.nvmlShutdown()


def _from_smi(card: str, run: Callable[[list[str]], str]) -> CardMemory | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = run([smi, "-i", card, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"])
    lines = [line for line in out.splitlines() if line.strip()]
    return parse_smi_line(lines[0]) if lines else None


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def read_card_memory(card: str | None = None, run: Callable[[list[str]], str] = _run) -> CardMemory | None:
    """The memory of ``card`` (default: ``visible_card()``), or None when neither NVML nor
    nvidia-smi can see a GPU (a CPU host). ``run`` runs nvidia-smi (tests inject one).

    Raises:
        subprocess.SubprocessError, ValueError: nvidia-smi exists but failed or printed
            something unexpected (a broken driver is not "no GPU").
    """
    card = card or visible_card()
    memory = _from_nvml(card)
    if memory is None:
        memory = _from_smi(card, run)
    return memory
