"""DuoAttention's options (``accel_kwargs``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ...config import AccelConfig
from .gates import DuoGates


@dataclass
class DuoConfig(AccelConfig):
    pattern: Any = None  # None (default_pattern), a (layers, kv_heads) bool tensor, a DuoGates, or a gates folder
    sparsity: float | None = None  # share of streaming heads (default: the gates' own, else 0.5)
    sink: int | None = None  # first visible tokens a streaming head keeps (default: the gates', else 64)
    recent: int | None = None  # last visible tokens a streaming head keeps (default: the gates', else 256)
    slack: int = 64  # streaming entries a layer may hold beyond sink + recent before it compacts
    # cache_implementation="static": slots of the fixed buffers (default: prompt + max_new_tokens). A fixed value
    # across calls keeps the compiled decode step's shapes, so HF's compiled graph is reused instead of recompiled.
    max_cache_len: int | None = None
    # cache_implementation="static": the decode step's attention, "math" (two matmuls + softmax: splits over the
    # slots) or "sdpa" (torch's fused kernel: one block per head down all slots)
    static_kernel: str = "math"

    def validate(self, method: str) -> None:
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.sink is not None and (not integer(self.sink) or self.sink < 0):
            raise ValueError(f"accel={method!r}: sink must be an integer >= 0 (0 = no sink tokens), got {self.sink!r}")
        if self.recent is not None and (not integer(self.recent) or self.recent < 1):
            raise ValueError(
                f"accel={method!r}: recent must be an integer >= 1 (a query always sees itself), got {self.recent!r}"
            )
        if not integer(self.slack) or self.slack < 1:
            raise ValueError(f"accel={method!r}: slack must be an integer >= 1, got {self.slack!r}")
        if self.max_cache_len is not None and (not integer(self.max_cache_len) or self.max_cache_len < 1):
            raise ValueError(
                f"accel={method!r}: max_cache_len must be an integer >= 1 (slots of the static cache), "
                f"got {self.max_cache_len!r}"
            )
        if self.static_kernel not in ("math", "sdpa"):
            raise ValueError(f"accel={method!r}: static_kernel must be 'math' or 'sdpa', got {self.static_kernel!r}")
        if self.sparsity is not None and (
            isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
            or not 0.0 <= self.sparsity <= 1.0
        ):
            raise ValueError(f"accel={method!r}: sparsity must be a number in [0, 1], got {self.sparsity!r}")
        p = self.pattern
        if not (p is None or isinstance(p, (str, os.PathLike, DuoGates, torch.Tensor, list, tuple))
                or hasattr(p, "__array__")):
            raise ValueError(
                f"accel={method!r}: pattern must be None, a (layers, kv_heads) bool tensor (True = retrieval head), "
                f"a DuoGates or a gates artifact folder; got {type(p).__name__}"
            )
