"""DuoAttention on the static engine (``accel=["duo_attention", <speculative>]`` with ``cache_implementation="static"``):
:class:`EngineDuoCache`, the KV of the engine's workspace (engine/backends.py ``_Workspace``) in place of its plain
slot buffers.

The static engine writes a verify forward's N tree nodes at the slots ``region`` of fixed buffers of L slots, attends
through a 4D mask (slot validity, tree ancestry, windows), then keeps the accepted path (``compact``) and moves
``start`` on. One layer (:class:`EngineDuoLayer`) holds:

* retrieval KV heads: ``rk``/``rv`` (B, Hr, L, D), slot-indexed like the engine's plain buffers (the engine's mask
  as it is; compaction and defragmentation gather them the same way);
* streaming KV heads on a full-attention layer: one buffer ``sk``/``sv`` (B, Hs, W + 1 + nodes, D), W = sink +
  recent, with the logical position of every entry (``epos``, -1 = empty) and ``seen`` (B,), the row's committed
  tokens. Columns ``[0, sink)`` hold the row's first ``sink`` tokens, ``[sink, W)`` a ring of its last ``recent``
  committed ones, column W is a trash entry (never visible), and ``[W + 1, W + 1 + nodes)`` the scratch of the
  current verify's nodes;
* streaming heads on a sliding-window layer (whose first ``sink`` visible slots slide): slot-indexed full buffers,
  with the rank rule applied to the engine's mask (a cumsum over the slots, fixed shape).

The rule is the dynamic DuoCache's (package docstring): a streaming head sees, of the tokens a query may see, the
first ``sink`` and the last ``recent``. On a full-attention layer a tree node at logical position p may see every
committed token (positions 0 .. P-1) and its ancestors and itself (P .. p), so the rank of the token at position x is
x + 1 and the rule is positional: visible iff ``x < sink`` or ``x > p - recent``. The verify forward writes the
nodes' streaming keys into the scratch and attends over [sink | ring | trash | scratch] under that rule (ring entries
by ``epos``, scratch entries by the engine's tree mask and their positions; deeper nodes see fewer of the oldest ring
entries), and the commit appends the accepted nodes to the ring (ranks ``seen + j``; an entry that a longer accepted
path would overwrite in the same commit, and every unaccepted column, goes to the trash entry). Both are fixed-shape
device work with no host read: the verify is part of the engine's captured verify step, the append of its captured
compaction. The prefill (eager) attends over its own keys under the rank mask and writes the entries that stay.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .static_cache import DuoCacheStats, StaticDuoKV, StaticDuoLayer, _attend_gqa, _first_update, _static_address


class EngineDuoLayer(StaticDuoLayer):
    """One decoder layer of an :class:`EngineDuoCache` (module docstring). ``owner``: the engine's workspace
    (``write_idx``: the slots this forward writes; ``slot_pos``: every slot's logical position, the region's
    included; ``max_slots``; ``nodes``: the widest verify; ``prefilling``)."""

    def __init__(self, owner, retrieval: torch.Tensor, sink: int, recent: int, window: int | None = None,
                 kernel: str = "math"):
        super().__init__(retrieval, sink, recent, owner.max_slots, window, kernel)
        self.owner = owner
        self.ring = window is None
        self.width = self.sink + self.recent if self.ring else self.max_cache_len
        self.scratch = self.width + 1  # first scratch column (column `width` is the trash entry)
        self.epos = None

    def __repr__(self) -> str:
        return (f"EngineDuoLayer(retrieval={self.n_ret}, streaming={self.n_str}, slots={self.max_cache_len}, "
                f"streaming_width={self.width})")

    @torch.compiler.disable
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, dk, dv = _first_update(self, key_states, value_states)
        dev, n = self.device, self.max_cache_len
        self.rk = key_states.new_zeros(b, self.n_ret, n, dk)
        self.rv = value_states.new_zeros(b, self.n_ret, n, dv)
        cols = self.scratch + self.owner.nodes if self.ring else n
        self.sk = key_states.new_zeros(b, self.n_str, cols, dk)
        self.sv = value_states.new_zeros(b, self.n_str, cols, dv)
        self.epos = torch.full((b, cols), -1, dtype=torch.long, device=dev)
        self.seen = torch.zeros(b, dtype=torch.long, device=dev)
        self.ret_idx, self.str_idx = self.ret_heads.to(dev), self.str_heads.to(dev)
        self._q_idx = {}
        for t in (self.rk, self.rv, self.sk, self.sv, self.epos, self.seen, self.ret_idx, self.str_idx):
            _static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        idx = self.owner.write_idx
        k_str, v_str = self._write_split(key_states, value_states, idx)
        if k_str is not None and not self.ring:
            self.sk.index_copy_(2, idx, k_str)
            self.sv.index_copy_(2, idx, v_str)
        view = StaticDuoKV(self, k_str, v_str, idx)
        return view, view

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0  # the engine gives positions and masks explicitly (as its plain slot buffers)

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """A new request on this (reused) workspace: the rings are empty (slot-indexed buffers are governed by the
        engine's slot validity)."""
        if self.is_initialized:
            self.epos.fill_(-1)
            self.seen.zero_()

    # -- attention (StaticDuoLayer.attend calls this for the streaming heads) -------------------------------------
    def _streaming(self, kv, qs, allowed, g, scaling, softcap, dropout):
        if not self.ring:  # slot-indexed: the rank rule on the engine's mask
            return self._chunked(qs, allowed, lambda a: self._rank_keep(a)[:, None], self.sk, self.sv, g, scaling,
                                 softcap, dropout)
        if self.owner.prefilling:
            return self._prefill_ring(kv, qs, allowed, g, scaling, softcap, dropout)
        return self._verify_ring(kv, qs, allowed, g, scaling, softcap, dropout)

    def _verify_ring(self, kv, qs, allowed, g, scaling, softcap, dropout):
        """The tree nodes over [sink | ring | trash | scratch]: fixed shapes, no host read (captured)."""
        b, _, n, _ = qs.shape
        c0, region = self.scratch, kv.pos
        self.sk.narrow(2, c0, n).copy_(kv.k_str)
        self.sv.narrow(2, c0, n).copy_(kv.v_str)
        npos = self.owner.slot_pos.index_select(1, region)  # (B, n) the nodes' logical positions
        self.epos.narrow(1, c0, n).copy_(npos)
        lo = npos[:, :, None] - self.recent  # a token at x is visible to the node at p iff x < sink or x > p - recent
        e = self.epos[:, None, :c0]
        ring = (e >= 0) & ((e < self.sink) | (e > lo))  # (B, n, W + 1); the trash entry's epos is -1
        x = npos[:, None, :]
        nodes = allowed.index_select(2, region) & ((x < self.sink) | (x > lo))  # (B, n, n): tree ancestry too
        parts = [ring, nodes]
        rest = self.sk.shape[2] - c0 - n
        if rest:  # scratch columns of a wider verify width: stale, never visible
            parts.append(torch.zeros(b, n, rest, dtype=torch.bool, device=nodes.device))
        smask = torch.cat(parts, dim=2)[:, None]
        return _attend_gqa(qs, self.sk, self.sv, smask, g, scaling, softcap, dropout, self.kernel)

    @torch.compiler.disable  # data-dependent writes: eager (the prefill is never captured)
    def _prefill_ring(self, kv, qs, allowed, g, scaling, softcap, dropout):
        """A chunk of the prompt (the backend prefills a KV method's cache in chunks of queries): the ring (the
        earlier chunks' entries that stay; empty at the first) and the chunk's own keys under the rule, then the
        entries that stay are written (logical position = rank among the row's real tokens). The rule is positional
        as in :meth:`_verify_ring`: a real token of rank r sees, of the real tokens up to it, those of rank < sink or
        > r - recent (at the first chunk exactly the rank rule on its own mask)."""
        region = kv.pos
        a = allowed.index_select(2, region)  # (B, q, q): the chunk's causal and padding mask
        real = a.diagonal(dim1=1, dim2=2)  # (B, q): a real token sees itself, padding does not
        r = self.seen[:, None] + real.long().cumsum(1) - 1  # (B, q) each token's rank
        lo = r[:, :, None] - self.recent
        e = self.epos[:, None, : self.scratch]  # the sink, the ring and the trash entry (epos -1: never seen)
        ring = (e >= 0) & ((e < self.sink) | (e > lo))
        x = r[:, None, :]
        own = a & ((x < self.sink) | (x > lo))
        k = torch.cat([self.sk.narrow(2, 0, self.scratch), kv.k_str], dim=2)
        v = torch.cat([self.sv.narrow(2, 0, self.scratch), kv.v_str], dim=2)
        out = _attend_gqa(qs, k, v, torch.cat([ring, own], dim=2)[:, None], g, scaling, softcap, dropout, self.kernel)
        total = self.seen + real.long().sum(1)
        stays = real & ((r < self.sink) | (r >= total[:, None] - self.recent))
        idx = torch.where(r < self.sink, r, self.sink + (r - self.sink).remainder(self.recent))
        bb, ii = torch.nonzero(stays, as_tuple=True)
        jj = idx[bb, ii]
        self.sk[bb, :, jj] = kv.k_str[bb, :, ii]
        self.sv[bb, :, jj] = kv.v_str[bb, :, ii]
        self.epos[bb, jj] = r[bb, ii]
        self.seen.copy_(total)
        return out

    # -- the engine's commit and defragmentation ------------------------------------------------------------------
    def compact(self, src: torch.Tensor, region: torch.Tensor, n_keep: torch.Tensor) -> None:
        """Keep each row's accepted nodes: ``src`` (B, n) the slots of the j-th kept node (identity past the path),
        ``region`` (n,) this verify's slots, ``n_keep`` (B,) the path lengths. Slot-indexed buffers gather them to
        the region's front (as the engine's plain buffers); the rings append them. Fixed shapes (captured)."""
        slot_indexed = [self.rk, self.rv] if self.n_ret else []
        if self.n_str and not self.ring:
            slot_indexed += [self.sk, self.sv]
        for t in slot_indexed:
            kept = t.gather(2, src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))
            t.index_copy_(2, region, kept)
        if not (self.n_str and self.ring):
            return
        n = src.shape[1]
        col = src - region[:1] + self.scratch  # (B, n) the scratch column of the j-th kept node
        j = torch.arange(n, device=src.device)[None, :]
        r = self.seen[:, None] + j  # its rank among the row's tokens (= its logical position)
        total = (self.seen + n_keep)[:, None]
        stays = (j < n_keep[:, None]) & ((r < self.sink) | (r >= total - self.recent))
        idx = torch.where(r < self.sink, r, self.sink + (r - self.sink).remainder(self.recent))
        tgt = torch.where(stays, idx, self.width)  # dropped: the trash entry (never visible)
        for t in (self.sk, self.sv):
            picked = t.gather(2, col[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))
            t.scatter_(2, tgt[:, None, :, None].expand_as(picked), picked)
        self.epos.scatter_(1, tgt, self.epos.gather(1, col))
        self.epos.select(1, self.width).fill_(-1)
        self.seen.add_(n_keep)

    def defragment(self, idx: torch.Tensor) -> None:
        """The engine moved each row's valid slots to the front (``idx`` (B, L): new slot -> old slot)."""
        ts = [self.rk, self.rv] if self.n_ret else []
        if self.n_str and not self.ring:
            ts += [self.sk, self.sv]
        for t in ts:
            t.copy_(t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])))

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.nbytes for t in (self.rk, self.rv, self.sk, self.sv))


class EngineDuoCache(DuoCacheStats, Cache):
    """The static engine's KV for a DuoAttention composition: one :class:`EngineDuoLayer` per decoder layer."""

    def __init__(self, owner, pattern: torch.Tensor, sink: int, recent: int, windows: list | None = None,
                 kernel: str = "math"):
        pattern = torch.as_tensor(pattern, dtype=torch.bool)
        windows = windows or [None] * pattern.shape[0]
        super().__init__(layers=[
            EngineDuoLayer(owner, pattern[i], sink, recent, windows[i], kernel) for i in range(pattern.shape[0])
        ])
        self.pattern = pattern

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    def reset_request(self) -> None:
        for layer in self.layers:
            layer.reset()

    def compact(self, src, region, n_keep) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.compact(src, region, n_keep)

    def defragment(self, idx) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.defragment(idx)


__all__ = ["EngineDuoCache", "EngineDuoLayer"]
