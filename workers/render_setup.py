"""From the worker's settings (and its catalog entry) to what the render model is loaded with
(pipeline class, memory profile, fast preset, recompile hook), and the fit check that runs
before it loads.

Kept out of ``workers.services``: the fit check runs in the Celery parent (never CUDA: NVML or
nvidia-smi only), the options in the render child; both read the same settings.

A catalog entry (``broker.catalog.ModelSpec``) and the worker's own settings combine so:

* profile: ``EDITFARM_PROFILE`` when it is set, else the entry's ``profile``, else ``bf16``;
* fused LoRAs: the entry's ``fuse_loras`` first, then ``EDITFARM_FUSE_LORAS``'s, all fused;
* scheduler overrides: the entry's ``defaults.scheduler``, then ``EDITFARM_SCHEDULER_OVERRIDES``
  on top (a key in both takes the setting's value).

The settings win because they are the narrower scope: one pool's deployment, not every worker
of the model; an operator trying a scheduler change on one pool needs no catalog edit.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workers import metrics
from workers.card_memory import read_card_memory
from workers.fitcheck import EXIT_DOES_NOT_FIT, startup_refusal
from workers.pipeline.base import MAX_NATIVE_SIDE
from workers.pipeline.presets import FastPreset, PresetError
from workers.pipeline.profiles import ProfileError, parse_profile, usable_here
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from broker.catalog import ModelSpec

__all__ = ["exit_if_unfit", "fused_lora_fetcher", "load_options", "profile_name", "refusal"]

log = logging.getLogger("editfarm.worker")

DEFAULT_PIPELINE = "QwenImageEditPipeline"


def profile_name(settings: WorkerSettings, spec: ModelSpec | None = None) -> str:
    """The memory profile to load with: ``EDITFARM_PROFILE`` when set (in the environment or
    given), else ``spec``'s ``profile``, else the settings' default."""
    if spec is None or spec.profile is None or "profile" in settings.model_fields_set:
        return settings.profile
    return spec.profile


def load_options(settings: WorkerSettings, spec: ModelSpec | None = None, *,
                 fetch_lora: Callable[[str], str] | None = None) -> dict[str, Any]:
    """``load_renderer``'s keyword arguments for the profile and preset in ``settings``, and with
    a catalog entry ``spec`` its pipeline class, operations, fused LoRAs, scheduler overrides and
    profile, combined with the settings as the module docstring says. A fused LoRA that is not a
    local file (s3://, https://, hf://) is fetched with ``fetch_lora(uri) -> local path``
    (default: :func:`fused_lora_fetcher`).

    Raises:
        ProfileError, PresetError: a setting or the entry's profile is malformed, or a fused
            LoRA cannot be fetched.
    """
    preset = FastPreset.parse(fuse_loras=settings.fuse_loras, scheduler_overrides=settings.scheduler_overrides,
                              block_cache=settings.block_cache, block_cache_threshold=settings.block_cache_threshold,
                              compile=settings.compile_transformer, warmup_sizes=settings.warmup_sizes)
    options: dict[str, Any] = {"profile": parse_profile(profile_name(settings, spec)), "preset": preset,
                               "on_recompile": metrics.recompiled, "pipeline": DEFAULT_PIPELINE}
    if spec is None:
        return options
    fetch = fetch_lora or fused_lora_fetcher(settings)
    fused = tuple((fetch(lora.uri), lora.scale) for lora in spec.fuse_loras)
    scheduler = {**dict(spec.defaults.scheduler), **preset.scheduler}
    overridden = sorted(set(spec.defaults.scheduler) & set(preset.scheduler))
    if overridden:
        log.info("EDITFARM_SCHEDULER_OVERRIDES replaces model %s's scheduler setting(s) %s", spec.name,
                 ", ".join(overridden))
    options.update(preset=dataclasses.replace(preset, fuse_loras=fused + preset.fuse_loras, scheduler=scheduler),
                   pipeline=spec.pipeline, operations=tuple(op.value for op in spec.operations))
    return options


def fused_lora_fetcher(settings: WorkerSettings) -> Callable[[str], str]:
    """``fetch(uri) -> local path`` for a catalog entry's fused LoRAs: a local path as it is,
    ``hf://owner/repo/path.safetensors`` from the hub (huggingface_hub's cache and token),
    ``s3://`` and ``https://`` through the per-request LoRAs' resolver (its cache, byte cap, URL
    policy and buckets: ``EDITFARM_LORA_*``). ``fetch`` raises ``PresetError`` with the reason."""
    resolver: Any = None

    def fetch(uri: str) -> str:
        nonlocal resolver
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if not scheme:
            return uri
        try:
            if scheme == "hf":
                return _from_hub(uri)
            if resolver is None:
                from workers.loras import LoraResolver, LoraSettings

                resolver = LoraResolver.from_settings(_object_store(settings), LoraSettings())
            return str(resolver.resolve(uri))
        except Exception as exc:  # hub, S3 and HTTP clients raise many types
            raise PresetError(f"fused LoRA {uri!r} cannot be fetched: {type(exc).__name__}: {exc}"[:500]) from exc

    return fetch


def _from_hub(uri: str) -> str:
    from huggingface_hub import hf_hub_download

    owner, repo, filename = uri[len("hf://"):].split("/", 2)
    return str(hf_hub_download(repo_id=f"{owner}/{repo}", filename=filename))


def _object_store(settings: WorkerSettings) -> Any:
    from storage import S3Config, S3ObjectStore

    s = settings
    secret = s.s3_secret_access_key.get_secret_value() if s.s3_secret_access_key else None
    return S3ObjectStore(S3Config(bucket=s.s3_bucket, endpoint_url=s.s3_endpoint_url, region=s.s3_region,
                                  access_key_id=s.s3_access_key_id, secret_access_key=secret,
                                  path_style=s.s3_path_style))


def refusal(settings: WorkerSettings, read_card: Any = read_card_memory, *, spec: ModelSpec | None = None
            ) -> str | None:
    """Why this render worker must not load its model (its profile cannot run here, or does not
    fit the card's free memory at the model's largest side), or None. ``spec``: the catalog entry
    it serves (its pipeline class, profile and largest side); None: ``EDITFARM_MODEL`` as an
    edit model. ``read_card`` is injectable."""
    if settings.renderer == "standin":
        return None
    profile = profile_name(settings, spec)
    if not settings.fit_check:
        # no memory estimate, but still refuse what can never work
        try:
            parsed = parse_profile(profile)
            if settings.device == "cpu":
                parsed.check_device("cpu")
        except ProfileError as exc:
            return str(exc)
        return None

    def card() -> Any:
        try:
            return read_card()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise _Unreadable(str(exc)) from None

    # a model renders at most its native side per pipeline call (larger outputs go by tiles or a work area)
    side = min(spec.max_side_px or MAX_NATIVE_SIDE, MAX_NATIVE_SIDE) if spec is not None else MAX_NATIVE_SIDE
    pipeline = spec.pipeline if spec is not None else DEFAULT_PIPELINE
    try:
        return startup_refusal(profile, settings.device, card, side, usable=usable_here, pipeline=pipeline)
    except _Unreadable as exc:
        if settings.device == "auto":
            # the child picks the device; a host with a broken nvidia-smi may still render on the CPU
            log.warning("fit check skipped: cannot read the card's memory with NVML/nvidia-smi (%s)", exc)
            return None
        return f"cannot read the card's memory with NVML/nvidia-smi ({exc}); set EDITFARM_FIT_CHECK=false to skip"


class _Unreadable(Exception):
    pass


def exit_if_unfit(settings: WorkerSettings, spec: ModelSpec | None = None) -> None:
    """In the Celery parent, before the pool forks: exit with ``EXIT_DOES_NOT_FIT`` and the reason
    instead of letting every render child crash on an out-of-memory warm-up, again and again.
    ``spec``: the catalog entry this worker serves (see :func:`refusal`)."""
    reason = refusal(settings, spec=spec)
    if reason is None:
        return
    log.error("not starting: %s", reason)
    print(f"editfarm worker: not starting: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_DOES_NOT_FIT)
