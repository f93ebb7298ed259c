"""DuoAttention's gates and head patterns: :class:`DuoGates` (the trained part), the deterministic default pattern,
and how a ``pattern=`` option becomes a (layers, kv_heads) bool tensor (True = retrieval head)."""

from __future__ import annotations

import os

import torch
from torch import nn

from ... import models
from ...integrations import artifacts

KIND = "duo_attention"


class DuoGates(nn.Module, artifacts.TrainedPart):
    """One gate per (layer, KV head), trained by ``hf-accel train duo``: 1 = the head needs the whole context
    (retrieval head), 0 = sink + recent tokens are enough (streaming head). ``sink`` and ``recent`` are the
    window the gates were trained with; ``sparsity`` the share of streaming heads chosen when the pattern
    is deployed without an explicit one."""

    kind = KIND

    def __init__(self, model, sink: int = 64, recent: int = 256, sparsity: float = 0.5):
        super().__init__()
        d = models.dims(model)
        self.__dict__["base"] = model  # the target (frozen, not ours): not a submodule of the gates
        self.sink, self.recent, self.sparsity = int(sink), int(recent), float(sparsity)
        self.gates = nn.Parameter(torch.ones(d["layers"], d["kv_heads"]))

    def settings(self) -> dict:
        return dict(sink=self.sink, recent=self.recent, sparsity=self.sparsity)

    def retrieval(self, sparsity: float | None = None) -> torch.Tensor:
        """(layers, kv_heads) bool: True = retrieval head. The ``sparsity`` share of all heads with the lowest
        gates (one global quantile over layers, as the reference code does) become streaming heads."""
        return pattern_from_scores(self.gates.detach().float().cpu(), self.sparsity if sparsity is None else sparsity)


def pattern_from_scores(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(layers, kv_heads) bool, True = retrieval: the round(sparsity * n) lowest-scoring heads stream (ties
    broken by a stable sort over the flattened (layer, head) order)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"accel='duo_attention': sparsity must be in [0, 1], got {sparsity!r}")
    flat = scores.reshape(-1)
    n_stream = int(round(sparsity * flat.numel()))
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:n_stream]] = False
    return keep.reshape(scores.shape)


def default_pattern(model, sparsity: float) -> torch.Tensor:
    """The deterministic pattern used when no trained one is given: every layer loses its highest-index KV
    heads first, layer by layer from the last layer, so the round(sparsity * n) streaming heads are spread
    evenly (each layer's count differs by at most one) and shallow layers keep retrieval heads longest."""
    d = models.dims(model)
    n_layers, n_heads = d["layers"], d["kv_heads"]
    # score: lower streams first; head index dominates, then deeper layers first
    head = torch.arange(n_heads, dtype=torch.float64)[None, :].expand(n_layers, -1)
    layer = torch.arange(n_layers, dtype=torch.float64)[:, None].expand(-1, n_heads)
    scores = -(head * n_layers + layer)
    return pattern_from_scores(scores, sparsity)


def resolve_pattern(model, pattern, sparsity: float | None = None, method: str = KIND) -> torch.Tensor:
    """The (layers, kv_heads) bool pattern (True = retrieval head, on the CPU) that ``pattern`` stands for."""
    d = models.dims(model)
    shape = (d["layers"], d["kv_heads"])
    if pattern is None:
        out = default_pattern(model, 0.5 if sparsity is None else sparsity)
    elif isinstance(pattern, (DuoGates, str, os.PathLike)):
        gates = artifacts.part_from(pattern, DuoGates, model, method)
        out = gates.retrieval(sparsity)
    else:
        try:
            out = torch.as_tensor(pattern)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"accel={method!r}: pattern can't be read as a tensor ({type(pattern).__name__})") from None
        if out.dtype != torch.bool:
            raise ValueError(
                f"accel={method!r}: a pattern tensor must be bool (True = retrieval head, False = streaming head); "
                f"got dtype {out.dtype}"
            )
    out = out.detach().to("cpu", torch.bool)
    if tuple(out.shape) != shape:
        raise ValueError(
            f"accel={method!r}: pattern has shape {tuple(out.shape)}, but this model needs (layers, kv_heads) = "
            f"{shape}: one entry per KV head of every decoder layer (True = retrieval head)."
        )
    return out
