"""Per-request LoRA adapters on a loaded Qwen-Image pipeline.

Adapters are loaded once into the (shared) transformer and kept, disabled, between requests:
a request's adapters are switched on with their scales for that request only and the model
is switched back to its base weights afterwards (PEFT's disabled adapters compute exactly the
base layer, so the next request's bytes equal those of a model that never saw a LoRA).
Imports neither torch nor diffusers (it drives the pipeline it is given).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from .base import MAX_LORAS, InvalidRequest

__all__ = ["LoraCache", "file_digest"]

log = logging.getLogger("editfarm.lora")


def file_digest(path: str) -> str:
    """SHA-256 (hex) of the file at ``path``. Raises OSError if it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LoraCache:
    """The adapters loaded into ``pipe``'s transformer, least recently used first.

    An adapter is keyed by its file's content (SHA-256), not its path: the same weights under
    another path (a fresh download of the same object) reuse the loaded adapter, and new
    content under an old path loads anew. Hashes are memoised by (path, size, mtime).

    Attributes:
        capacity: adapters kept loaded at most (>= ``MAX_LORAS``); the least recently used
            one beyond that is deleted from the model.
    """

    def __init__(self, pipe: Any, capacity: int = 8) -> None:
        if capacity < MAX_LORAS:
            raise ValueError(f"capacity must be >= {MAX_LORAS} (the most one request may use)")
        self.pipe = pipe
        self.capacity = capacity
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> path it came from
        self._digests: dict[tuple[str, int, int], str] = {}

    @property
    def loaded(self) -> list[str]:
        """Adapter names currently in the model, least recently used first."""
        return list(self._loaded)

    def _name(self, path: str) -> str:
        try:
            stat = os.stat(path)
            key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._digests:
                self._digests[key] = file_digest(path)
        except OSError as exc:
            # the tenant reads the message; the worker's path and OS text stay with the cause (logged)
            raise InvalidRequest("a LoRA file cannot be read") from exc
        return "lora_" + self._digests[key][:24]

    def _load(self, name: str, path: str, keep: set[str]) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        while len(self._loaded) >= self.capacity:
            victim = next(n for n in self._loaded if n not in keep)
            self.pipe.delete_adapters([victim])
            del self._loaded[victim]
            log.info("LoRA %s unloaded (cache full)", victim)
        try:
            with warnings.catch_warnings():
                # PEFT warns on every adapter after the first; several adapters are the point.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(path, adapter_name=name)
        except Exception as exc:  # diffusers/peft raise many types for a bad file
            with contextlib.suppress(Exception):  # a half-injected adapter must not linger
                self.pipe.delete_adapters([name])
            raise InvalidRequest("a LoRA file does not fit this model (it is not a LoRA of this model's "
                                 "layers, or not a safetensors file)") from exc
        if name not in self.pipe.get_list_adapters().get("transformer", []):
            raise InvalidRequest("a LoRA file has no weights for this model's transformer")
        self._loaded[name] = path
        log.info("LoRA %s loaded from %s", name, path)

    @contextlib.contextmanager
    def applied(self, loras: Sequence[tuple[str, float]]) -> Iterator[list[str]]:
        """Within the block, exactly ``loras`` ((path, scale) pairs) are active with their
        scales (the same file twice: the scales add up); on exit, however it is left, every
        adapter is disabled again. Yields the adapter names.

        Raises:
            InvalidRequest: a file cannot be read or does not fit the model.
        """
        if not loras:
            yield []
            return
        weights: dict[str, float] = {}
        paths: dict[str, str] = {}
        for path, scale in loras:
            name = self._name(path)
            weights[name] = weights.get(name, 0.0) + float(scale)
            paths.setdefault(name, path)
        try:
            for name, path in paths.items():
                self._load(name, path, keep=set(paths))
            self.pipe.enable_lora()
            self.pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
            yield list(weights)
        finally:
            if self._loaded:
                self.pipe.disable_lora()
