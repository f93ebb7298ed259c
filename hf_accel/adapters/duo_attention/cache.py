"""DuoAttention's cache: :class:`DuoCache`, one :class:`DuoLayer` per decoder layer (retrieval heads keep every slot,
streaming heads the slots they may still need; eviction in amortised chunks: see the package docstring)."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import DuoKV, _allowed, _attend_gqa
from .static_cache import DuoCacheStats, _first_update


def _keep_tail(t: torch.Tensor, start: int, index: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, S, D) with the slots from ``start`` on replaced by ``start + index[b, j]`` (B, K)."""
    idx = index.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
    return torch.cat([t[:, :, :start], t[:, :, start:].gather(2, idx)], dim=2)


class DuoLayer(CacheLayerMixin):
    """One decoder layer's KV for DuoAttention: the retrieval KV heads' keys/values for every slot
    (``rk``/``rv``: B, Hr, S, D) and the streaming heads' keys/values for the slots they may still need
    (``sk``/``sv``: B, Hs, Ss, D) with the slot id of every entry per row (``sid``: B, Ss; -1 = empty)."""

    is_sliding = False  # windows are applied by the masks, over all slots (like the engine's full layers)
    is_compileable = False
    is_croppable = False

    def __init__(self, retrieval: torch.Tensor, sink: int, recent: int, slack: int, window: int | None = None):
        super().__init__()
        retrieval = torch.as_tensor(retrieval, dtype=torch.bool).reshape(-1)
        self.n_kv = int(retrieval.numel())
        self.ret_heads = torch.nonzero(retrieval).flatten()
        self.str_heads = torch.nonzero(~retrieval).flatten()
        self.n_ret, self.n_str = int(self.ret_heads.numel()), int(self.str_heads.numel())
        self.sink, self.recent, self.slack, self.window = int(sink), int(recent), int(slack), window
        self.length = 0  # slots covered (every slot ever appended, minus what the engine compacted away)
        self.rk = self.rv = self.sk = self.sv = self.sid = None
        self.compactions = 0
        self._check_at = 0
        self._index: dict = {}

    def __repr__(self) -> str:
        return f"DuoLayer(retrieval={self.n_ret}, streaming={self.n_str}, slots={self.length})"

    # -- transformers' cache-layer interface ---------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, dk, dv = _first_update(self, key_states, value_states)
        self.rk = key_states.new_empty(b, self.n_ret, 0, dk)
        self.rv = value_states.new_empty(b, self.n_ret, 0, dv)
        self.sk = key_states.new_empty(b, self.n_str, 0, dk)
        self.sv = value_states.new_empty(b, self.n_str, 0, dv)
        self.sid = torch.empty(b, 0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def _heads(self, device):
        idx = self._index.get(("kv", device))
        if idx is None:
            idx = self._index[("kv", device)] = (self.ret_heads.to(device), self.str_heads.to(device))
        return idx

    def _q_heads(self, heads: int, device):
        """Query-head indices of the retrieval and streaming groups (query head h uses KV head h // groups)."""
        key = ("q", heads, device)
        idx = self._index.get(key)
        if idx is None:
            g = heads // self.n_kv
            ar = torch.arange(g)
            idx = self._index[key] = (
                (self.ret_heads[:, None] * g + ar).flatten().to(device),
                (self.str_heads[:, None] * g + ar).flatten().to(device),
            )
        return idx

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        ret, stream = self._heads(key_states.device)
        if self.n_ret:
            whole = self.n_str == 0
            self.rk = torch.cat([self.rk, key_states if whole else key_states.index_select(1, ret)], dim=2)
            self.rv = torch.cat([self.rv, value_states if whole else value_states.index_select(1, ret)], dim=2)
        if self.n_str:
            whole = self.n_ret == 0
            self.sk = torch.cat([self.sk, key_states if whole else key_states.index_select(1, stream)], dim=2)
            self.sv = torch.cat([self.sv, value_states if whole else value_states.index_select(1, stream)], dim=2)
            ids = torch.arange(self.length, self.length + q, device=self.sid.device)
            self.sid = torch.cat([self.sid, ids[None].expand(self.sid.shape[0], -1)], dim=1)
        self.length += q
        view = DuoKV(self)
        return view, view

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple:
        return self.length + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.rk = self.rv = self.sk = self.sv = self.sid = None
        self.length, self.compactions, self._check_at = 0, 0, 0
        self.is_initialized = False

    def offload(self):
        return None

    def prefetch(self):
        return None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a DuoCache can't be cropped: its streaming heads have dropped slots that an earlier length would need. "
            "duo_attention does not run with HF assisted decoding; use accel=['duo_attention', <method>] instead."
        )

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows`` (in that order)."""
        if not self.is_initialized:
            return
        rows = rows.to(self.sid.device)
        self.rk, self.rv, self.sk, self.sv = (t.index_select(0, rows) for t in (self.rk, self.rv, self.sk, self.sv))
        self.sid = self.sid.index_select(0, rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.rk, self.rv, self.sk, self.sv, self.sid = (
                t.repeat_interleave(repeats, dim=0) for t in (self.rk, self.rv, self.sk, self.sv, self.sid)
            )

    # -- the engine's slot bookkeeping (engine/cache.SlotCache delegates here) ------------------------------------
    def keep_slots(self, start: int, index: torch.Tensor, keep_valid: torch.Tensor) -> None:
        """Keep, per row, the slots ``start + index[b, j]`` of those appended since ``start`` (valid where
        ``keep_valid``) as slots ``start + j``; the layer then covers ``start + K`` slots."""
        if not self.is_initialized:
            return
        k = index.shape[1]
        if self.n_ret:
            self.rk, self.rv = _keep_tail(self.rk, start, index), _keep_tail(self.rv, start, index)
        if self.n_str:
            appended = self.length - start
            dev = self.sid.device
            index, keep_valid = index.to(dev), keep_valid.to(dev)
            inv = torch.full((index.shape[0], appended + 1), -1, dtype=torch.long, device=dev)
            col = torch.where(keep_valid, index, appended)  # dropped picks land in a spare column
            inv.scatter_(1, col, torch.arange(k, device=dev).expand_as(col).clone())
            sid = self.sid
            fresh = sid >= start
            j = inv.gather(1, (sid - start).clamp(0, appended))
            self.sid = torch.where(fresh, torch.where(j >= 0, start + j, -1), sid)
        self.length = start + k

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.nbytes for t in (self.rk, self.rv, self.sk, self.sv))

    def full_nbytes(self) -> int:
        """Bytes a full cache (every KV head, every slot) would hold for the same slots."""
        if not self.is_initialized:
            return 0
        t = self.rk if self.n_ret else self.sk
        u = self.rv if self.n_ret else self.sv
        return t.shape[0] * self.n_kv * self.length * (t.shape[-1] * t.element_size() + u.shape[-1] * u.element_size())

    @property
    def streaming_slots(self) -> int:
        """Entries per row the streaming store holds now (padded rows included)."""
        return 0 if self.sid is None else int(self.sid.shape[1])

    # -- attention -------------------------------------------------------------------------------------------------
    def attend(self, query, mask, scaling, softcap, window, dropout):
        """Attention of ``query`` (B, H, Q, D) over this layer after the forward's update -> ((B, Q, H, D), None).
        Long forwards (prefill) run in query chunks, so the per-query masks and ranks stay ~_CHUNK elements."""
        b, h, q, _ = query.shape
        s = self.length
        allowed = _allowed(mask, b, q, s, window, query.device)  # (B, Q, S)
        step = max(1, _CHUNK // max(1, b * s))
        if q <= step:
            out = self._attend_rows(query, allowed, scaling, softcap, dropout)
        else:
            out = torch.cat([self._attend_rows(query[:, :, i : i + step], allowed[:, i : i + step], scaling, softcap,
                                               dropout) for i in range(0, q, step)], dim=2)
        self._evict(allowed, q, window)
        return out.transpose(1, 2).contiguous(), None

    def _attend_rows(self, query, allowed, scaling, softcap, dropout):
        b, h, q, _ = query.shape
        g = h // self.n_kv
        q_ret, q_str = self._q_heads(h, query.device)
        out_r = out_s = None
        if self.n_ret:
            qr = query if self.n_str == 0 else query.index_select(1, q_ret)
            out_r = _attend_gqa(qr, self.rk, self.rv, allowed[:, None], g, scaling, softcap, dropout)
        if self.n_str:
            qs = query if self.n_ret == 0 else query.index_select(1, q_str)
            out_s = self._attend_streaming(qs, allowed, g, scaling, softcap, dropout)
        if out_r is None or out_s is None:
            out = out_r if out_s is None else out_s
        else:
            out = query.new_empty(b, h, q, out_r.shape[-1])
            out.index_copy_(1, q_ret, out_r)
            out.index_copy_(1, q_str, out_s)
        # queries that may see nothing (padding) give 0, whatever the kernel does with an empty row
        return out.masked_fill(~allowed.any(-1)[:, None, :, None], 0)

    def _attend_streaming(self, qs, allowed, g, scaling, softcap, dropout):
        sid = self.sid
        rank = allowed.cumsum(-1, dtype=torch.int32)  # 1-based rank of each visible slot in its query's row
        seen = rank[..., -1:]
        keep = allowed & ((rank <= self.sink) | (rank > seen - self.recent))
        smask = keep.gather(2, sid.clamp_min(0)[:, None, :].expand(-1, allowed.shape[1], -1))
        smask &= (sid >= 0)[:, None, :]  # (B, q, Ss)
        return _attend_gqa(qs, self.sk, self.sv, smask[:, None], g, scaling, softcap, dropout)

    def _evict(self, allowed, q: int, window) -> None:
        """Drop streaming entries no later query can need (module docstring), in amortised chunks."""
        if not self.n_str:
            return
        width = self.sid.shape[1]
        if width <= self.sink + self.recent + self.slack or width < self._check_at:
            return
        seen = allowed.any(1)  # U: (B, S) slots some query of this forward may see
        if window is not None or self.window is not None:
            need_slot = seen  # a later window's first `sink` slots can be any of them
        else:
            rank = seen.cumsum(-1, dtype=torch.int32)
            after = rank[:, -1:] - rank  # visible slots after this one
            need_slot = seen & ((rank <= self.sink) | (after < self.recent + q))
        sid = self.sid
        need = need_slot.gather(1, sid.clamp_min(0)) & (sid >= 0)
        kept = int(need.sum(1).max())  # one host sync, only when the layer is over its budget
        chunk = max(1, self.slack // 2)
        # next check: when the layer holds `chunk` more than a one-token forward after this one would need (after a
        # prefill or a tree verify that is far less than now: the q-slot margin goes once the step is committed)
        self._check_at = max(0, kept - q + 1) + chunk
        if width - kept < chunk:
            return
        order = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :kept]  # needed first, slot order kept
        self.sid = torch.where(need.gather(1, order), sid.gather(1, order), -1)
        gk = order[:, None, :, None].expand(-1, self.n_str, -1, self.sk.shape[-1])
        gv = order[:, None, :, None].expand(-1, self.n_str, -1, self.sv.shape[-1])
        self.sk, self.sv = self.sk.gather(2, gk), self.sv.gather(2, gv)
        self.compactions += 1


_CHUNK = 1 << 22  # elements of a (B, q, S) mask / rank tensor before a forward is split over queries


class DuoCache(DuoCacheStats, Cache):
    """A transformers Cache of :class:`DuoLayer` s, one per decoder layer (see the module docstring)."""

    def __init__(self, pattern: torch.Tensor, sink: int, recent: int, slack: int = 64, windows: list | None = None):
        pattern = torch.as_tensor(pattern, dtype=torch.bool)
        windows = windows or [None] * pattern.shape[0]
        super().__init__(layers=[DuoLayer(pattern[i], sink, recent, slack, windows[i]) for i in range(pattern.shape[0])])
        self.pattern = pattern
