"""The ``duo_attention`` method: a KV method (see the package docstring)."""

from __future__ import annotations

import os

from ... import models
from ...integrations import artifacts
from ...engine.adapter import KVMethod
from ...registry import register
from .attention import duo_request
from .cache import DuoCache
from .config import DuoConfig
from .gates import KIND, DuoGates, resolve_pattern
from .engine_cache import EngineDuoCache
from .static_cache import StaticDuoCache


def unsupported_reason(model) -> str | None:
    """Why duo_attention can't drive ``model`` (None: it can): its attention must go through transformers'
    AttentionInterface (so that a registered implementation and a custom cache reach it) and have no attention
    sinks (``s_aux`` logits added to the softmax, which the streaming rule does not model)."""
    return models.attention_interface_unsupported(model)


@register(KIND)
class DuoAttention(KVMethod):
    """``accel="duo_attention"``: see the module docstring."""

    Config = DuoConfig
    lossless = False
    static_unsupported = None  # alone: its own StaticDuoCache (cache_implementation="static"), compiled by HF
    #: a composition (accel=["duo_attention", <speculative>]) runs on the static engine on an EngineDuoCache
    static_engine_unsupported = None

    def __init__(self, model, config: DuoConfig):
        super().__init__(model, config)
        reason = unsupported_reason(model)
        if reason:
            raise models.UnsupportedModelError(
                f"accel={self.name!r} can't run on {type(model).__name__}: {reason}. Call generate() without "
                "accel= for this model."
            )
        p = config.pattern
        gates = None
        if isinstance(p, (DuoGates, str, os.PathLike)):
            gates = artifacts.part_from(p, DuoGates, model, self.name)
            p = gates
        self.pattern = resolve_pattern(model, p, config.sparsity, self.name)
        self.sink = config.sink if config.sink is not None else (gates.sink if gates is not None else 64)
        self.recent = config.recent if config.recent is not None else (gates.recent if gates is not None else 256)
        self.slack = config.slack
        self.max_cache_len = config.max_cache_len
        self.static_kernel = config.static_kernel
        self.windows = models.layer_windows(model)

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        # it runs with the deterministic default pattern, but that is not the method a benchmark should report
        if kwargs.get("pattern") is None:
            return "no trained gates (accel_kwargs pattern=...; `hf-accel train duo`)"
        if isinstance(kwargs["pattern"], (str, os.PathLike)):
            return artifacts.missing(kwargs["pattern"], DuoGates, "trained gates")
        return None

    def new_cache(self, max_forward: int = 1) -> DuoCache:
        # max_forward is not needed: eviction keeps the last recent + (this forward's width) visible slots
        return DuoCache(self.pattern, self.sink, self.recent, self.slack, self.windows)

    def new_static_cache(self, needed: int) -> StaticDuoCache:
        """The fixed-shape cache for ``cache_implementation="static"`` (HF compiles the decode step on it): ``needed``
        slots (prompt + max_new_tokens), or the ``max_cache_len`` option when given (at least ``needed``)."""
        length = self._fixed_length(needed)
        return StaticDuoCache(self.pattern, self.sink, self.recent, length, self.windows, self.static_kernel)

    def engine_max_length(self, needed: int) -> int:
        """The static engine's length for a composition: ``needed`` (prompt + max_new_tokens), or the
        ``max_cache_len`` option when given (at least ``needed``), so that calls of different lengths share one
        workspace and its captured graphs."""
        return self._fixed_length(needed)

    def _fixed_length(self, needed: int) -> int:
        length = needed if self.max_cache_len is None else self.max_cache_len
        if length < needed:
            raise ValueError(
                f"accel={self.name!r}: max_cache_len={self.max_cache_len} is shorter than this call needs (prompt + "
                f"max_new_tokens = {needed}): raise max_cache_len or leave it unset."
            )
        return length

    def engine_cache(self, workspace) -> EngineDuoCache:
        """The static engine's KV for a composition (engine/backends.py ``_Workspace``): retrieval heads in its
        slot-indexed buffers, streaming heads in sink + recent rings with a scratch for the verify's nodes."""
        return EngineDuoCache(workspace, self.pattern, self.sink, self.recent, self.windows, self.static_kernel)

    def engine_key(self) -> tuple:
        """What a static-engine workspace built by :meth:`engine_cache` depends on (its buffers and graphs)."""
        p = self.pattern
        return ("duo_attention", tuple(p.shape), tuple(p.flatten().tolist()), self.sink, self.recent,
                tuple(self.windows), self.static_kernel)

    def attention(self):
        return duo_request(self.model)

    def finished(self, cache: DuoCache, stats) -> None:
        stats.kv_cache_bytes = cache.nbytes()
        stats.extra.update(
            retrieval_share=cache.retrieval_share,
            full_kv_bytes=cache.full_nbytes(),
            sink=self.sink,
            recent=self.recent,
            slack=self.slack,
            streaming_slots=max((layer.streaming_slots for layer in cache.layers), default=0),
        )
        if isinstance(cache, (StaticDuoCache, EngineDuoCache)):
            stats.extra.update(static=True, max_cache_len=cache.max_cache_len, static_kernel=self.static_kernel)
        else:
            stats.extra["compactions"] = sum(layer.compactions for layer in cache.layers)
