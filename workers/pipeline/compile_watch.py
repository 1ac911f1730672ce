"""Make torch.compile's recompiles visible.

A compiled transformer recompiles when it meets a shape it has not seen (another output size,
another prompt length before dynamo marks that dimension dynamic): seconds to minutes during
which the worker renders nothing. The warm-up compiles the shapes the worker serves; any
compile after that is logged with the shapes that caused it and reported to ``on_recompile``
(the worker counts it in ``editfarm_compile_after_warmup_total``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CompileWatch"]

log = logging.getLogger("editfarm.pipeline")


class CompileWatch:
    """Counts dynamo compiles of this process; after ``arm()`` each one is a recompile.

    Attributes:
        warmup_compiles: compiles seen before ``arm()``.
        recompiles: compiles seen after it.
        last_shapes: the input shapes of the transformer's latest forward (hidden states, text
            states), recorded by ``watch_shapes``.
    """

    def __init__(self, on_recompile: Callable[[float], None] | None = None) -> None:
        self.on_recompile = on_recompile
        self.warmup_compiles = 0
        self.recompiles = 0
        self.armed = False
        self.last_shapes: tuple[Any, ...] = ()
        self._started = 0.0
        self._lock = threading.Lock()
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def close(self) -> None:
        """Stop watching (tests; a worker watches for its whole life)."""
        from torch._dynamo.callback import callback_handler

        callback_handler.remove_start_callback(self._start)
        callback_handler.remove_end_callback(self._end)

    def watch_shapes(self, module: Any) -> None:
        """Record the shapes of ``module``'s tensor inputs on every forward (microseconds)."""
        def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensors = [*args, kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")]
            self.last_shapes = tuple(tuple(t.shape) for t in tensors if hasattr(t, "shape"))

        module.register_forward_pre_hook(record, with_kwargs=True)

    def arm(self) -> None:
        """The warm-up is over: from now on a compile is a recompile."""
        self.armed = True
        log.info("torch.compile warm-up done: %d compile(s)", self.warmup_compiles)

    def _start(self, _args: Any) -> None:
        self._started = time.monotonic()

    def _end(self, _args: Any) -> None:
        seconds = time.monotonic() - self._started
        with self._lock:
            if not self.armed:
                self.warmup_compiles += 1
                return
            self.recompiles += 1
        log.warning("torch.compile recompiled after warm-up (%.1f s; input shapes %s): add this size to "
                    "EDITFARM_WARMUP_SIZES so the warm-up compiles it", seconds, self.last_shapes)
        if self.on_recompile is not None:
            self.on_recompile(seconds)
