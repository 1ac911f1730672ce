"""From the worker's settings to what the render model is loaded with (memory profile, fast
preset, recompile hook), and the fit check that runs before it loads.

Kept out of ``workers.services``: the fit check runs in the Celery parent (never CUDA: NVML or
nvidia-smi only), the options in the render child; both read the same settings.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

from workers import metrics
from workers.card_memory import read_card_memory
from workers.fitcheck import EXIT_DOES_NOT_FIT, startup_refusal
from workers.pipeline.base import MAX_NATIVE_SIDE
from workers.pipeline.presets import FastPreset
from workers.pipeline.profiles import ProfileError, parse_profile, usable_here
from workers.settings import WorkerSettings

__all__ = ["exit_if_unfit", "load_options", "refusal"]

log = logging.getLogger("editfarm.worker")


def load_options(settings: WorkerSettings) -> dict[str, Any]:
    """``load_renderer``'s keyword arguments for the profile and preset in ``settings``.

    Raises:
        ProfileError, PresetError: a setting is malformed.
    """
    preset = FastPreset.parse(fuse_loras=settings.fuse_loras, scheduler_overrides=settings.scheduler_overrides,
                              block_cache=settings.block_cache, block_cache_threshold=settings.block_cache_threshold,
                              compile=settings.compile_transformer, warmup_sizes=settings.warmup_sizes)
    return {"profile": parse_profile(settings.profile), "preset": preset, "on_recompile": metrics.recompiled}


def refusal(settings: WorkerSettings, read_card: Any = read_card_memory) -> str | None:
    """Why this render worker must not load its model (its profile cannot run here, or does not
    fit the card's free memory at the model's largest side), or None. ``read_card`` is injectable."""
    if settings.renderer == "standin":
        return None
    if not settings.fit_check:
        # no memory estimate, but still refuse what can never work
        try:
            profile = parse_profile(settings.profile)
            if settings.device == "cpu":
                profile.check_device("cpu")
        except ProfileError as exc:
            return str(exc)
        return None

    def card() -> Any:
        try:
            return read_card()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise _Unreadable(str(exc)) from None

    try:
        return startup_refusal(settings.profile, settings.device, card, MAX_NATIVE_SIDE, usable=usable_here)
    except _Unreadable as exc:
        if settings.device == "auto":
            # the child picks the device; a host with a broken nvidia-smi may still render on the CPU
            log.warning("fit check skipped: cannot read the card's memory with NVML/nvidia-smi (%s)", exc)
            return None
        return f"cannot read the card's memory with NVML/nvidia-smi ({exc}); set EDITFARM_FIT_CHECK=false to skip"


class _Unreadable(Exception):
    pass


def exit_if_unfit(settings: WorkerSettings) -> None:
    """In the Celery parent, before the pool forks: exit with ``EXIT_DOES_NOT_FIT`` and the reason
    instead of letting every render child crash on an out-of-memory warm-up, again and again."""
    reason = refusal(settings)
    if reason is None:
        return
    log.error("not starting: %s", reason)
    print(f"editfarm worker: not starting: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_DOES_NOT_FIT)
