"""Memory profiles: how a model's weights are stored and where they live, as plain data.

A profile is a ``+``-joined set of parts, e.g. ``fp8-storage+offload-text-encoder``:

* ``bf16``: every weight in the model dtype on the render device (the default; alone only);
* ``fp8-storage``: the transformer's weights stored in float8_e4m3fn and cast up layer by
  layer for compute (diffusers layerwise casting); norms, embeddings and the first and last
  transformer blocks stay in the model dtype (float8 there turns outputs into noise);
* ``int8`` / ``fp8``: the transformer's linear weights quantized weight-only with torchao
  (exclusive with each other and with ``fp8-storage``);
* ``offload-text-encoder``: the text encoder lives in host memory and is brought onto the
  device one block at a time while it encodes (diffusers group offloading);
* ``offload``: the transformer likewise, block by block (streams on CUDA, never
  ``record_stream``).

This module is pure (no torch, no diffusers): the Celery parent, the fit check and a later
model catalog parse and compare profiles without loading anything. ``workers.pipeline.memory``
applies one to a loaded pipeline.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

__all__ = [
    "PARTS",
    "MemoryProfile",
    "ProfileError",
    "all_profiles",
    "parse_profile",
    "torchao_available",
    "usable_here",
]

# Parts in their canonical order (names are written in this order).
PARTS: tuple[str, ...] = ("bf16", "fp8-storage", "int8", "fp8", "offload-text-encoder", "offload")
_WEIGHT_FORMATS = ("fp8-storage", "int8", "fp8")


class ProfileError(ValueError):
    """A profile name that is malformed, combines exclusive parts, or that this device (or this
    installation) cannot do. The message says why and what would work."""


@dataclass(frozen=True)
class MemoryProfile:
    """One parsed profile. A model catalog entry can carry the same fields.

    Attributes:
        weights: how the transformer's weights are stored: "model" (the model dtype),
            "fp8-storage" (layerwise casting), "int8" or "fp8" (torchao weight-only).
        offload_text_encoder: the text encoder is group-offloaded to host memory.
        offload: the transformer is group-offloaded to host memory.
    """

    weights: str = "model"
    offload_text_encoder: bool = False
    offload: bool = False

    @property
    def name(self) -> str:
        """The canonical name, e.g. ``fp8-storage+offload-text-encoder``; ``bf16`` for none."""
        parts = [] if self.weights == "model" else [self.weights]
        if self.offload_text_encoder:
            parts.append("offload-text-encoder")
        if self.offload:
            parts.append("offload")
        return "+".join(parts) or "bf16"

    @property
    def needs_torchao(self) -> bool:
        return self.weights in ("int8", "fp8")

    @property
    def offloads(self) -> bool:
        """Whether any module moves between host and device memory."""
        return self.offload or self.offload_text_encoder

    def check_device(self, device_type: str) -> None:
        """Refuse what ``device_type`` ("cuda", "cpu", ...) cannot do, instead of ignoring it.

        Offloading moves weights between host memory and an accelerator's memory; on the CPU
        host memory *is* the render device, so an offload profile there would change nothing
        (refused, not silently ignored). ``fp8-storage``, ``int8`` and ``fp8`` work on the CPU
        (float8 storage is cast up in software; torchao has CPU paths), so they are allowed.

        Raises:
            ProfileError: the device cannot do this profile.
        """
        if self.offloads and device_type == "cpu":
            raise ProfileError(
                f"profile {self.name!r} offloads weights to host memory, but this worker renders on the "
                "CPU, where that changes nothing; use a profile without offload parts on the CPU "
                f"(e.g. {self.without_offload().name!r})"
            )

    def without_offload(self) -> MemoryProfile:
        return MemoryProfile(weights=self.weights)


def parse_profile(text: str) -> MemoryProfile:
    """``text`` (parts joined with ``+``, any order, case-insensitive) as a ``MemoryProfile``.

    Raises:
        ProfileError: an empty or unknown part, a part twice, ``bf16`` combined with anything,
            or two weight formats (``fp8-storage``, ``int8``, ``fp8``) at once.
    """
    raw = [part.strip().lower() for part in (text or "").split("+")]
    if not raw or any(not part for part in raw):
        raise ProfileError(f"profile {text!r} is empty or has an empty part; expected parts of {PARTS} joined by '+'")
    unknown = [part for part in raw if part not in PARTS]
    if unknown:
        raise ProfileError(f"unknown profile part(s) {unknown} in {text!r}; expected parts of {PARTS} joined by '+'")
    if len(set(raw)) != len(raw):
        raise ProfileError(f"profile {text!r} names a part twice")
    if "bf16" in raw and len(raw) > 1:
        raise ProfileError(f"'bf16' is the plain profile and combines with nothing; got {text!r}")
    formats = [part for part in raw if part in _WEIGHT_FORMATS]
    if len(formats) > 1:
        raise ProfileError(f"profile {text!r} names two weight formats {formats}; pick one of {_WEIGHT_FORMATS}")
    return MemoryProfile(weights=formats[0] if formats else "model",
                         offload_text_encoder="offload-text-encoder" in raw, offload="offload" in raw)


def torchao_available() -> bool:
    """Whether torchao can be imported here (the ``int8`` / ``fp8`` profiles need it)."""
    return importlib.util.find_spec("torchao") is not None


def usable_here(profile: MemoryProfile) -> bool:
    """Whether this installation has what ``profile`` needs (torchao for ``int8`` / ``fp8``)."""
    return not profile.needs_torchao or torchao_available()


def all_profiles() -> list[MemoryProfile]:
    """Every valid combination: 4 weight formats x offloading the text encoder or not x
    offloading the transformer or not (16 profiles), ``bf16`` first."""
    return [MemoryProfile(weights=w, offload_text_encoder=te, offload=tr)
            for w in ("model", *_WEIGHT_FORMATS) for te in (False, True) for tr in (False, True)]
