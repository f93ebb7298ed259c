"""KV-cache bookkeeping for batched speculative decoding on a transformers DynamicCache.

Rows of a batch accept different numbers of tokens per step, so the cache of a row may hold *holes*:
slots that belong to padding or to rejected draft tokens. :class:`SlotCache` keeps, per row and slot,
whether the slot is valid and which logical position (RoPE / learned position) it holds. Attention
masks are built from that (engine.tree.attention_masks), so holes cost memory, never correctness.

After each verify forward, :meth:`SlotCache.keep` compacts the freshly appended slots so that each row
keeps exactly its accepted path (tree compaction, not only a crop), and crops the cache to the longest
kept path. Sliding-window layers are held as full layers (the window is applied by the mask), which is
what makes rollback possible on them.

A cache layer that keeps its slots its own way (DuoAttention's per-head layer) defines ``length`` (slots it
covers), ``keep_slots(start, index, keep_valid)``, ``select_rows(rows)`` and ``nbytes()``; SlotCache delegates
to those instead of touching ``keys``/``values``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _self_managed(layer) -> bool:
    return hasattr(layer, "keep_slots") or hasattr(layer, "nbytes")  # DuoAttention's layers count their own bytes


def _layer_tensors(cache):
    for layer in cache.layers:
        if _self_managed(layer):
            continue
        if getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True):
            continue
        if layer.keys.numel() == 0:
            continue
        yield layer


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers cache's key/value tensors (0 for None)."""
    if cache is None:
        return 0
    own = sum(layer.nbytes() for layer in getattr(cache, "layers", ()) if _self_managed(layer))
    return own + sum(layer.keys.nbytes + layer.values.nbytes for layer in _layer_tensors(cache))


class SlotCache:
    def __init__(self, cache: DynamicCache, batch: int, device):
        self.cache = cache
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def append(self, valid: torch.Tensor, pos: torch.Tensor) -> None:
        """Record the slots a forward has just appended to every layer."""
        self.valid = torch.cat([self.valid, valid], dim=1)
        self.pos = torch.cat([self.pos, pos], dim=1)

    def keep(self, start: int, index: torch.Tensor, keep_valid: torch.Tensor) -> None:
        """Keep, per row, the appended slots ``start + index[b, j]`` (valid where ``keep_valid``), in order.

        ``index`` is (B, K) relative to ``start``; the cache ends up with ``start + K`` slots.
        """
        k = index.shape[1]
        for layer in self.cache.layers:
            if _self_managed(layer) and layer.length:
                if layer.length != self.length:
                    raise RuntimeError(
                        f"cache layer covers {layer.length} slots but {self.length} were recorded; "
                        "a layer of this model does not append to the cache on every forward"
                    )
                layer.keep_slots(start, index, keep_valid)
        for layer in _layer_tensors(self.cache):
            for name in ("keys", "values"):
                t = getattr(layer, name)
                if t.shape[-2] != self.length:
                    raise RuntimeError(
                        f"cache layer holds {t.shape[-2]} slots but {self.length} were recorded; "
                        "a layer of this model does not append to the cache on every forward"
                    )
                idx = index.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
                kept = t[:, :, start:].gather(2, idx)
                t = t[:, :, : start + k]
                t[:, :, start:] = kept
                setattr(layer, name, t)
        self.pos = torch.cat([self.pos[:, :start], self.pos[:, start:].gather(1, index)], dim=1)
        self.valid = torch.cat([self.valid[:, :start], keep_valid], dim=1)

    def drop_rows_of_step(self, start: int, rows: list) -> None:
        """Mark the slots appended since ``start`` invalid for the rows flagged in ``rows`` (rows that kept nothing)."""
        if any(rows):
            flag = torch.tensor(rows, dtype=torch.bool, device=self.valid.device)
            self.valid[:, start:] &= ~flag[:, None]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows from the cache (rows = indices of the rows that stay)."""
        for layer in self.cache.layers:
            if _self_managed(layer):
                layer.select_rows(rows)
        for layer in _layer_tensors(self.cache):
            layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            layer.values = layer.values.index_select(0, rows.to(layer.values.device))
        self.valid = self.valid.index_select(0, rows)
        self.pos = self.pos.index_select(0, rows)

    def nbytes(self) -> int:
        return cache_nbytes(self.cache)
