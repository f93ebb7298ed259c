"""DuoAttention's options (``accel_kwargs``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...config import AccelConfig, option
from .gates import DuoGates


@dataclass
class DuoConfig(AccelConfig):
    part_option = "pattern"  # also accepted as part= (AccelConfig.part_option)
    pattern: Any = None  # None (default_pattern), a (layers, kv_heads) bool tensor, a DuoGates, or a gates folder
    sparsity: float | None = option(None, min=0, max=1)  # share of streaming heads (default: the gates', else 0.5)
    sink: int | None = option(None, min=0)  # first visible tokens a streaming head keeps (0 = none; default 64)
    recent: int | None = option(None, min=1)  # last visible tokens a streaming head keeps (default: gates', else 256)
    slack: int = option(64, min=1)  # streaming entries a layer may hold beyond sink + recent before it compacts
    # cache_implementation="static": slots of the fixed buffers (default: prompt + max_new_tokens). A fixed value
    # across calls keeps the compiled decode step's shapes, so HF's compiled graph is reused instead of recompiled
    # (composed with a speculative method: the static engine's length, one workspace and one capture for all calls).
    max_cache_len: int | None = option(None, min=1)
    # cache_implementation="static": the decode step's attention, "math" (two matmuls + softmax: splits over the
    # slots) or "sdpa" (torch's fused kernel: one block per head down all slots)
    static_kernel: Literal["math", "sdpa"] = "math"
    # cache_implementation="static", duo_attention alone: what decodes on the static cache. "auto" (default): hf_accel's
    # static engine where its steps are captured as CUDA graphs (a GPU, compile not disabled, one device) and the
    # call asks nothing the engine refuses, else HF's compiled generate; "engine": the engine (an error for what it
    # refuses); "hf": HF's own compiled generate on a StaticDuoCache
    runner: Literal["auto", "engine", "hf"] = "auto"

    def validate(self, method: str) -> None:
        p = self.pattern
        if not (p is None or isinstance(p, (str, os.PathLike, DuoGates, torch.Tensor, list, tuple))
                or hasattr(p, "__array__")):
            raise ValueError(
                f"accel={method!r}: pattern must be None, a (layers, kv_heads) bool tensor (True = retrieval head), "
                f"a DuoGates or a gates artifact folder; got {type(p).__name__}"
            )
