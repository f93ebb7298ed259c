"""DuoAttention on fixed buffers: :class:`StaticDuoCache` (``cache_implementation="static"``), which HF's generate
compiles the decode step of, as it does for its own StaticCache.

Layout of one layer (:class:`StaticDuoLayer`), all allocated once at the first forward and then written in place:

* retrieval KV heads: ``rk``/``rv`` (B, Hr, L, D), slot ``p`` at index ``p`` (L = ``max_cache_len``), as HF's
  StaticLayer;
* streaming KV heads on a full-attention layer: ``sk``/``sv`` (B, Hs, sink + recent, D): indices ``[0, sink)`` hold
  the row's first ``sink`` visible slots, ``[sink, sink + recent)`` a ring of its last ``recent``; ``spos`` (B, W)
  the slot each entry holds (-1 = empty) and ``seen`` (B,) how many visible (non-padding) slots the row has had.
  Keys are stored after RoPE (as HF stores them), so an entry only needs its slot for masking;
* streaming heads on a sliding-window layer (whose first ``sink`` visible slots slide with the window) and when
  ``sink + recent >= L``: full-length buffers, index = slot, with the rank rule applied to the mask.

The rule is the dynamic DuoCache's (package docstring): a streaming head sees, of the slots the mask allows, the first
``sink`` and the last ``recent``, counted per row without padding. In a one-token forward on a full-attention layer
the ring *is* that set once the new key is written (its rank is the row's ``seen``; it lands at ``seen`` while
``seen < sink``, else at ``sink + (seen - sink) % recent``), so the decode step reads the ring under a mask of its
``spos``, with fixed shapes, no host read, and no branch on tensor values: HF's compiled decode step (CUDA graphs)
captures it. Longer forwards (the prefill, HF's chunked prefill) run eagerly: the streaming heads attend over the
ring plus the forward's own keys under the rank mask, then the entries that stay are written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

_CHUNK = 1 << 22  # elements of a (B, q, L) rank tensor before a long forward's streaming heads split over queries
_PACK_MAX = 64


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def _static_address(t: torch.Tensor) -> None:
    if not _compiling():
        torch._dynamo.mark_static_address(t)


def _attend(q, k, v, mask, scaling, softcap, dropout=0.0):
    """Attention over K/V with as many heads as ``q``: torch sdpa (its own kernel choice, which fixed shapes keep
    stable), or eager math as transformers' eager with a logit softcap."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    w = torch.matmul(q, k.transpose(-1, -2)) * scale
    w = torch.tanh(w / softcap) * softcap
    if mask is not None:
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        w = F.dropout(w, p=dropout, training=True)
    return torch.matmul(w, v)


def _attend_math(q, k, v, mask, scaling, softcap):
    """Attention as two matmuls and a float32 softmax (``q``: B, Hkv, Q', D over ``k``/``v``: B, Hkv, S, D). For a
    fixed-shape decode step this splits over the S slots (the matmul tiles over S, inductor splits the softmax
    reduction), where the fused kernels run one block per (head, query tile) down all S slots."""
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    w = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    return torch.matmul(torch.softmax(w, dim=-1).to(v.dtype), v)


def _attend_gqa(q, k, v, mask, groups: int, scaling, softcap, dropout=0.0, kernel: str = "sdpa"):
    """``q`` (B, Hkv * groups, Q, D) over ``k``/``v`` (B, Hkv, S, D), ``mask`` (B, 1, Q, S) bool. Few queries: the
    query heads of a KV head are folded into the query axis (no repeated K/V), and ``kernel="math"`` runs them as
    :func:`_attend_math`; many: K/V repeated, torch sdpa."""
    b, hq, n, d = q.shape
    if kernel == "math" and n <= _PACK_MAX and not dropout:
        hk = k.shape[1]
        s = mask.shape[-1]
        m = mask if n == 1 else (  # one query: (B, 1, 1, S) broadcasts over the folded query heads as it is
            mask.expand(b, 1, n, s)[:, :, None].expand(b, 1, groups, n, s).reshape(b, 1, groups * n, s))
        out = _attend_math(q.reshape(b, hk, groups * n, d), k, v, m, scaling, softcap)
        return out.reshape(b, hq, n, out.shape[-1])
    if groups == 1:
        return _attend(q, k, v, mask, scaling, softcap, dropout)
    if n > _PACK_MAX:
        hk = k.shape[1]
        k = k[:, :, None].expand(b, hk, groups, k.shape[2], k.shape[3]).reshape(b, hq, k.shape[2], k.shape[3])
        v = v[:, :, None].expand(b, hk, groups, v.shape[2], v.shape[3]).reshape(b, hq, v.shape[2], v.shape[3])
        return _attend(q, k, v, mask, scaling, softcap, dropout)
    hk = hq // groups
    folded = q.reshape(b, hk, groups * n, d)
    s = mask.shape[-1]
    mask = mask.expand(b, 1, n, s)[:, :, None].expand(b, 1, groups, n, s).reshape(b, 1, groups * n, s)
    out = _attend(folded, k, v, mask, scaling, softcap, dropout)
    return out.reshape(b, hq, n, out.shape[-1])


def _first_update(layer, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple:
    """A DuoAttention cache layer's first update: checks that the model's keys have the pattern's KV heads, takes
    their dtype and device; returns (batch, key dim, value dim)."""
    b, h, _, dk = key_states.shape
    if h != layer.n_kv:
        raise ValueError(
            f"duo_attention: the pattern has {layer.n_kv} KV heads for this layer but the model's keys have {h}"
        )
    layer.dtype, layer.device = key_states.dtype, key_states.device
    return b, dk, value_states.shape[-1]


class StaticDuoKV:
    """What :meth:`StaticDuoLayer.update` returns in place of key/value tensors: the layer, this forward's streaming
    keys/values (written by the attention, which has the mask) and the forward's slots."""

    __slots__ = ("layer", "k_str", "v_str", "pos")

    def __init__(self, layer, k_str, v_str, pos):
        self.layer, self.k_str, self.v_str, self.pos = layer, k_str, v_str, pos

    def __repr__(self) -> str:
        return f"StaticDuoKV({self.layer!r})"


def _allowed(mask, b: int, pos: torch.Tensor, length: int, window) -> torch.Tensor:
    """(B, Q, L) bool: which of the L slots each query (at slots ``pos``) may see."""
    if mask is None:
        ki = torch.arange(length, device=pos.device)[None, :]
        a = ki <= pos[:, None]
        if window is not None:
            a = a & (ki > pos[:, None] - window)
        return a[None].expand(b, -1, -1)
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise RuntimeError(f"duo_attention: per-head attention masks {tuple(mask.shape)} are not supported")
        mask = mask[:, 0]
    if mask.shape[-1] != length:
        raise RuntimeError(
            f"duo_attention: the attention mask {tuple(mask.shape)} does not cover the {length} slots of the static "
            "DuoAttention cache"
        )
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(b, pos.shape[0], length)


class StaticDuoLayer(CacheLayerMixin):
    """One decoder layer of a :class:`StaticDuoCache` (module docstring)."""

    is_compileable = True
    is_sliding = False  # windows come from the mask, over all L slots
    is_croppable = False

    def __init__(self, retrieval: torch.Tensor, sink: int, recent: int, max_cache_len: int, window: int | None = None,
                 kernel: str = "math"):
        super().__init__()
        self.kernel = kernel  # forwards of up to 64 queries (decode): "math" (matmuls, split over slots) or "sdpa"
        retrieval = torch.as_tensor(retrieval, dtype=torch.bool).reshape(-1)
        self.n_kv = int(retrieval.numel())
        self.ret_heads = torch.nonzero(retrieval).flatten()
        self.str_heads = torch.nonzero(~retrieval).flatten()
        self.n_ret, self.n_str = int(self.ret_heads.numel()), int(self.str_heads.numel())
        self.sink, self.recent, self.window = int(sink), int(recent), window
        self.max_cache_len = int(max_cache_len)
        # ring: streaming heads keep sink + recent entries; else full-length buffers (index = slot)
        self.ring = window is None and self.sink + self.recent < self.max_cache_len
        self.width = self.sink + self.recent if self.ring else self.max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long)
        self.rk = self.rv = self.sk = self.sv = self.spos = self.seen = None

    def __repr__(self) -> str:
        return (f"StaticDuoLayer(retrieval={self.n_ret}, streaming={self.n_str}, max_cache_len={self.max_cache_len}, "
                f"streaming_width={self.width})")

    # -- transformers' cache-layer interface ---------------------------------------------------------------------
    @torch.compiler.disable  # eager even inside a compiled forward (HF compiles chunked prefill): fixed addresses
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, dk, dv = _first_update(self, key_states, value_states)
        dev = self.device
        self.rk = key_states.new_zeros(b, self.n_ret, self.max_cache_len, dk)
        self.rv = value_states.new_zeros(b, self.n_ret, self.max_cache_len, dv)
        self.sk = key_states.new_zeros(b, self.n_str, self.width, dk)
        self.sv = value_states.new_zeros(b, self.n_str, self.width, dv)
        self.spos = torch.full((b, self.width), -1, dtype=torch.long, device=dev)
        self.seen = torch.zeros(b, dtype=torch.long, device=dev)
        self.cumulative_length = self.cumulative_length.to(dev)
        self.ret_idx, self.str_idx = self.ret_heads.to(dev), self.str_heads.to(dev)
        self._q_idx = {}
        self._rows = torch.arange(b, device=dev)
        # fixed addresses: the compiled step's CUDA graph writes the buffers in place and reads the index tensors
        for t in (self.rk, self.rv, self.sk, self.sv, self.spos, self.seen, self.cumulative_length, self.ret_idx,
                  self.str_idx, self._rows):
            _static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        pos = torch.arange(q, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(q)
        k_str, v_str = self._write_split(key_states, value_states, pos)
        view = StaticDuoKV(self, k_str, v_str, pos)
        return view, view

    def _write_split(self, key_states, value_states, idx):
        """The retrieval heads' K/V written at slots ``idx``; the streaming heads' K/V returned (None, None without
        streaming heads) for the caller to store its way."""
        if self.n_ret:
            whole = self.n_str == 0
            self.rk.index_copy_(2, idx, key_states if whole else key_states.index_select(1, self.ret_idx))
            self.rv.index_copy_(2, idx, value_states if whole else value_states.index_select(1, self.ret_idx))
        if not self.n_str:
            return None, None
        whole = self.n_ret == 0
        return (key_states if whole else key_states.index_select(1, self.str_idx),
                value_states if whole else value_states.index_select(1, self.str_idx))

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple:
        return self.max_cache_len, 0

    def get_seq_length(self, *args, **kwargs):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for t in (self.rk, self.rv, self.sk, self.sv, self.seen, self.cumulative_length):
                t.zero_()
            self.spos.fill_(-1)

    def offload(self):
        return None

    def prefetch(self):
        return None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a static DuoAttention cache can't be cropped: its streaming heads have overwritten slots that an earlier "
            "length would need. Use accel=['duo_attention', <method>] instead of HF assisted decoding."
        )

    def _rows_apply(self, fn) -> None:
        self.rk, self.rv, self.sk, self.sv, self.spos, self.seen = (
            fn(t) for t in (self.rk, self.rv, self.sk, self.sv, self.spos, self.seen)
        )
        self._rows = torch.arange(self.spos.shape[0], device=self.device)
        for t in (self.rk, self.rv, self.sk, self.sv, self.spos, self.seen, self._rows):
            _static_address(t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            rows = beam_idx.to(self.device)
            self._rows_apply(lambda t: t.index_select(0, rows))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rows_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.nbytes for t in (self.rk, self.rv, self.sk, self.sv))

    def full_nbytes(self) -> int:
        """Bytes HF's StaticCache would hold for this layer (every KV head, ``max_cache_len`` slots)."""
        if not self.is_initialized:
            return 0
        t, u = (self.rk, self.rv) if self.n_ret else (self.sk, self.sv)
        return t.shape[0] * self.n_kv * self.max_cache_len * (
            t.shape[-1] * t.element_size() + u.shape[-1] * u.element_size())

    @property
    def streaming_slots(self) -> int:
        return self.width if self.n_str else 0

    # -- attention -------------------------------------------------------------------------------------------------
    def _q_heads(self, heads: int):
        idx = self._q_idx.get(heads)
        if idx is None:
            g = heads // self.n_kv
            ar = torch.arange(g)
            idx = self._q_idx[heads] = (
                (self.ret_heads[:, None] * g + ar).flatten().to(self.device),
                (self.str_heads[:, None] * g + ar).flatten().to(self.device),
            )
            for t in idx:
                _static_address(t)
        return idx

    def attend(self, kv: StaticDuoKV, query, mask, scaling, softcap, window, dropout):
        """Attention of ``query`` (B, H, Q, D) -> ((B, Q, H, D), None); writes the forward's streaming keys."""
        b, h, q, _ = query.shape
        g = h // self.n_kv
        allowed = _allowed(mask, b, kv.pos, self.max_cache_len, window)  # (B, Q, L)
        q_ret, q_str = self._q_heads(h)
        out_r = out_s = None
        if self.n_ret:
            qr = query if self.n_str == 0 else query.index_select(1, q_ret)
            out_r = _attend_gqa(qr, self.rk, self.rv, allowed[:, None], g, scaling, softcap, dropout,
                                self.kernel)
        if self.n_str:
            if self.ring and window is not None:
                raise RuntimeError(
                    f"duo_attention: layer {self!r} was built without a sliding window, but the model applies one "
                    f"({window}); a static DuoAttention ring can't serve it"
                )
            qs = query if self.n_ret == 0 else query.index_select(1, q_str)
            out_s = self._streaming(kv, qs, allowed, g, scaling, softcap, dropout)
        if out_r is None or out_s is None:
            out = out_r if out_s is None else out_s
        else:
            out = query.new_empty(b, h, q, out_r.shape[-1])
            out.index_copy_(1, q_ret, out_r)
            out.index_copy_(1, q_str, out_s)
        if q > 1 or self.kernel != "math":  # queries that see nothing (padding) give 0, not what sdpa makes of them
            out = out.masked_fill(~allowed.any(-1)[:, None, :, None], 0)
        # (a one-query forward with the math kernel: a padding query's output is finite, and its keys are never seen)
        return out.transpose(1, 2).contiguous(), None

    def _rank_keep(self, allowed):
        """(B, Q, L): the slots a streaming head keeps of what each query may see (first sink, last recent)."""
        rank = allowed.cumsum(-1, dtype=torch.int32)
        seen = rank[..., -1:]
        return allowed & ((rank <= self.sink) | (rank > seen - self.recent))

    def _streaming(self, kv, qs, allowed, g, scaling, softcap, dropout):
        b, _, q, _ = qs.shape
        pos = kv.pos
        if not self.ring:  # full-length buffers: index = slot, rank rule on the mask
            self.sk.index_copy_(2, pos, kv.k_str)
            self.sv.index_copy_(2, pos, kv.v_str)
            self.spos.index_copy_(1, pos, pos[None].expand(b, -1).contiguous())
            return self._chunked(qs, allowed, lambda a: self._rank_keep(a)[:, None], self.sk, self.sv, g, scaling,
                                 softcap, dropout)
        if q == 1:  # decode: write the new key into the ring, then the ring is exactly what the query keeps
            real = allowed[:, 0].gather(1, pos[None].expand(b, 1)).squeeze(1)  # (B,) the new slot is not padding
            r = self.seen
            idx = torch.where(r < self.sink, r, self.sink + (r - self.sink).remainder(self.recent))
            rows = self._rows
            old_k, old_v = self.sk[rows, :, idx], self.sv[rows, :, idx]  # (B, Hs, D)
            keep = real[:, None, None]
            self.sk[rows, :, idx] = torch.where(keep, kv.k_str[:, :, 0], old_k)
            self.sv[rows, :, idx] = torch.where(keep, kv.v_str[:, :, 0], old_v)
            self.spos[rows, idx] = torch.where(real, pos.expand(b), self.spos[rows, idx])
            self.seen.add_(real.long())
            # every entry is a real slot before (or at) the query's on a full-attention layer: all visible to it (a
            # padding query, in a one-token chunk of a chunked prefill, sees nothing: see attend())
            smask = (self.spos >= 0)[:, None, :]
            return _attend_gqa(qs, self.sk, self.sv, smask[:, None], g, scaling, softcap, dropout, self.kernel)
        return self._streaming_long(kv, qs, allowed, g, scaling, softcap, dropout)

    @torch.compiler.disable  # data-dependent writes: eager, also when HF compiles a chunked prefill's forwards
    def _streaming_long(self, kv, qs, allowed, g, scaling, softcap, dropout):
        """A forward of several tokens on a ring layer: the ring plus this forward's keys under the rank mask, then
        the entries that stay are written."""
        b = qs.shape[0]
        pos = kv.pos
        k_all = torch.cat([self.sk, kv.k_str], dim=2)
        v_all = torch.cat([self.sv, kv.v_str], dim=2)
        pos_all = torch.cat([self.spos, pos[None].expand(b, -1)], dim=1)
        valid = (pos_all >= 0)[:, None, :]
        at = pos_all.clamp_min(0)[:, None, :]

        def visible(a):
            keep = self._rank_keep(a)
            return (keep.gather(2, at.expand(-1, a.shape[1], -1)) & valid)[:, None]

        out = self._chunked(qs, allowed, visible, k_all, v_all, g, scaling, softcap, dropout)
        self._write(kv, allowed)
        return out

    def _chunked(self, qs, allowed, visible, k, v, g, scaling, softcap, dropout):
        q = qs.shape[2]
        step = max(1, _CHUNK // max(1, qs.shape[0] * allowed.shape[-1]))
        if q <= step:
            return _attend_gqa(qs, k, v, visible(allowed), g, scaling, softcap, dropout, self.kernel)
        return torch.cat([
            _attend_gqa(qs[:, :, i:i + step], k, v, visible(allowed[:, i:i + step]), g, scaling, softcap, dropout,
                        self.kernel)
            for i in range(0, q, step)
        ], dim=2)

    def _write(self, kv, allowed) -> None:
        """Store the forward's streaming keys that stay: per row, ranks < sink and the last ``recent`` ranks."""
        b = allowed.shape[0]
        pos = kv.pos
        real = allowed.gather(2, pos[None, :, None].expand(b, -1, 1)).squeeze(-1)  # (B, q): slot is not padding
        r = self.seen[:, None] + real.long().cumsum(1) - 1
        total = self.seen + real.long().sum(1)
        stays = real & ((r < self.sink) | (r >= total[:, None] - self.recent))
        idx = torch.where(r < self.sink, r, self.sink + (r - self.sink).remainder(self.recent))
        bb, ii = torch.nonzero(stays, as_tuple=True)
        jj = idx[bb, ii]
        self.sk[bb, :, jj] = kv.k_str[bb, :, ii]
        self.sv[bb, :, jj] = kv.v_str[bb, :, ii]
        self.spos[bb, jj] = pos[ii]
        self.seen.copy_(total)


class DuoCacheStats:
    """KV bytes and the retrieval share of a DuoAttention cache (``layers`` with ``nbytes`` / ``full_nbytes``,
    ``pattern``): shared by the dynamic, static and static-engine caches."""

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        return sum(layer.full_nbytes() for layer in self.layers)

    @property
    def retrieval_share(self) -> float:
        return float(self.pattern.float().mean()) if self.pattern.numel() else 1.0


class StaticDuoCache(DuoCacheStats, Cache):
    """A transformers Cache of :class:`StaticDuoLayer` s (compileable: HF's generate compiles its decode step)."""

    def __init__(self, pattern: torch.Tensor, sink: int, recent: int, max_cache_len: int,
                 windows: list | None = None, kernel: str = "math"):
        pattern = torch.as_tensor(pattern, dtype=torch.bool)
        windows = windows or [None] * pattern.shape[0]
        super().__init__(layers=[
            StaticDuoLayer(pattern[i], sink, recent, max_cache_len, windows[i], kernel)
            for i in range(pattern.shape[0])
        ])
        self.pattern = pattern

    @property
    def max_cache_len(self) -> int:  # transformers 5.17's Cache has this property too
        return self.layers[0].max_cache_len


__all__ = ["StaticDuoCache", "StaticDuoKV", "StaticDuoLayer"]
