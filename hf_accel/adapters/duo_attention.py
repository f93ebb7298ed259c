"""DuoAttention (arXiv 2410.10819): retrieval and streaming KV heads. Lossy.

``generate(..., accel="duo_attention", accel_kwargs={"pattern": ..., "sparsity": 0.5, "sink": 64, "recent": 256})``.
Every KV head of every layer is either a *retrieval* head (keeps and attends to the whole context) or a
*streaming* head (attends only to the first ``sink`` and the last ``recent`` tokens it may see, and keeps little
more than those). The pattern is a (layers, kv_heads) bool tensor, True = retrieval: given as ``pattern=`` (a
tensor, :class:`DuoGates`, or a gates artifact folder, binarised at ``sparsity``, a share of streaming heads), or
:func:`default_pattern` when None.

How it runs. A KV method, not a speculative adapter: alone it runs inside transformers' own ``generate`` (greedy,
sampling, streamers, stopping criteria, ``return_dict_in_generate``... all HF's), with ``past_key_values=`` a
:class:`DuoCache` and the model's attention implementation switched to ``"hf_accel_duo"`` (registered with
``AttentionInterface`` and ``AttentionMaskInterface``) for the duration of the call only; it is put back on exit,
error or not, and nothing else on the model changes. ``DuoCache.update`` returns a :class:`DuoKV` container (not
tensors) that the registered attention function recognises; called with plain tensors (another thread using the
model meanwhile, HF's CFG pass) the same function computes ordinary attention (scaling, softcap, sliding windows
via the mask, GQA). Composed with a speculative method, ``accel=["duo_attention", "aded"]`` with
``accel_kwargs={"duo_attention": {...}, "aded": {...}}`` (or the GenerationConfig entry
``{"method": ["duo_attention", "aded"], "duo_attention": {...}, "aded": {...}}``), the shared engine decodes on a
DuoCache under the same attention function, reading "allowed" from its additive tree masks (value > min/2).

Choices that are ours (the paper's code is batch-1, prefix-only and position-based):

* Position-free rank rule. The attention mask (padding, causality, sliding windows, tree ancestry; HF's masks are
  built by ``sdpa_mask`` with ``allow_is_causal_skip=False``, so they always exist) says which KV slots a query
  may see. A streaming head sees, among those, only the first ``sink`` and the last ``recent`` in slot order
  (counted with a cumsum over the allowed row): the Λ-shaped mask in prefill, sink + recent window in decode,
  per row of a left-padded batch (padding is never counted) and per tree node. No position ids are read.
  Because the rule is defined per query over what it may see, a speculative method on top of duo_attention is
  lossless with respect to duo_attention alone (greedy: identical tokens).
* Eviction. Retrieval heads keep every slot, (B, Hr, S, D). Streaming heads keep (B, Hs, Ss, D) plus per-row slot
  ids (-1 = empty entry of a padded row). After each forward, with U = the slots some query of that forward could
  see, an entry is *needed* if its slot is among the first ``sink`` of U, or among the last ``recent + Q`` of U
  (Q = the forward's width: at most Q of them can still be rejected by a verify step, so the last ``recent``
  committed slots always survive), or — on sliding-window layers, where a later window's first ``sink`` slots
  slide — anywhere in U. Slots no query of this forward could see are never visible later (windows only move
  forward, rejected drafts are dropped, padding stays padding). Nothing appended by the current forward is
  ever dropped.
* Slack. Unneeded entries are dropped in amortised chunks (one gather per layer), not every step: only when a
  layer holds more than ``sink + recent + slack`` entries and at least ``slack // 2`` are unneeded. After each
  forward of width 1, a full-attention layer holds at most ``sink + recent + slack`` streaming entries per row
  (default slack 64). Correctness does not depend on ``slack`` (the ``+ Q`` margin does that), only memory and
  how often the gather runs.
* Defaults. ``pattern=None`` -> :func:`default_pattern` (deterministic, spread evenly over layers: no trained
  gates). With DuoGates, ``sink``/``recent``/``sparsity`` left unset come from the gates' own settings, else
  64 / 256 / 0.5. The model's own attention implementation (sdpa, eager, flash...) is replaced by ours (torch
  sdpa per head group; eager math when the family has a logit softcap, e.g. Gemma2) for the call.

* GQA. Query head h uses KV head h // (H / Hkv). Queries are split by the kind of their KV head, each group runs
  one attention (torch sdpa; eager math when the family has a logit softcap, e.g. Gemma2), and the outputs are
  scattered back to the original head order. Up to 64 queries (decode, tree verify) a KV head's query heads are
  folded into the query axis, so K/V are never copied per query head; longer forwards repeat K/V as HF does.

Works: alone on every family whose attention goes through transformers' AttentionInterface (the test matrix:
Llama, Qwen2/3, Mistral, Gemma2, Phi3, GPT-2, OPT), batch > 1 with padding, greedy and sampling, HF's chunked
prefill, ``num_return_sequences``, CFG; composed with a speculative method on the dynamic engine (ADED, Clover,
hidden transfer, LUD, EAD, QuantSpec; layer-skipping LoRA-Drop / M2R2 early exit too: each DuoLayer covers the
slots its own layer holds, and the engine's narrowed masks match it). Refused with a ValueError: beam search,
assistant models / prompt lookup (they crop the cache), a user ``past_key_values``, ``cache_implementation``
other than dynamic (static / offloaded / ...), the static engine in a composition, models whose attention does
not go through the AttentionInterface (Falcon, Bloom, ...), models with attention sinks (``s_aux``, GPT-OSS),
``sink < 0``, ``recent < 1``, a pattern of the wrong shape or dtype.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .. import models
from ..config import AccelConfig, option
from ..engine.adapter import KVMethod
from ..integrations import artifacts
from ..registry import register

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


# ---- configuration and pattern ----------------------------------------------------------------------------------

ATTN_NAME = "hf_accel_duo"  # the attention (and mask) implementation registered for the duration of a request


@dataclass
class DuoConfig(AccelConfig):
    pattern: Any = None  # None (default_pattern), a (layers, kv_heads) bool tensor, a DuoGates, or a gates folder
    sparsity: float | None = option(None, min=0, max=1)  # share of streaming heads (default: the gates', else 0.5)
    sink: int | None = option(None, min=0)  # first visible tokens a streaming head keeps (0 = none; default 64)
    recent: int | None = option(None, min=1)  # last visible tokens a streaming head keeps (default: gates', else 256)
    slack: int = option(64, min=1)  # streaming entries a layer may hold beyond sink + recent before it compacts

    def validate(self, method: str) -> None:
        p = self.pattern
        if not (p is None or isinstance(p, (str, os.PathLike, DuoGates, torch.Tensor, list, tuple))
                or hasattr(p, "__array__")):
            raise ValueError(
                f"accel={method!r}: pattern must be None, a (layers, kv_heads) bool tensor (True = retrieval head), "
                f"a DuoGates or a gates artifact folder; got {type(p).__name__}"
            )


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


# ---- which models can run it ------------------------------------------------------------------------------------


def _attention_module(layer: nn.Module):
    for name in ("self_attn", "attn", "self_attention", "attention"):
        m = getattr(layer, name, None)
        if isinstance(m, nn.Module):
            return m
    for m in layer.children():
        if "attention" in type(m).__name__.lower():
            return m
    return None


def unsupported_reason(model) -> str | None:
    """Why duo_attention can't drive ``model`` (None: it can): its attention must go through transformers'
    AttentionInterface (so that a registered implementation and a custom cache reach it) and have no attention
    sinks (``s_aux`` logits added to the softmax, which the streaming rule does not model)."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return "its attention does not go through transformers' AttentionInterface"
    for layer in models.layers(model):
        attn = _attention_module(layer)
        if attn is None:
            return "no attention module was found in its decoder layers"
        src = models._source_of(type(attn))
        if "ALL_ATTENTION_FUNCTIONS" not in src and "attention_interface" not in src:
            return f"its attention ({type(attn).__name__}) does not go through transformers' AttentionInterface"
        if "s_aux" in src or isinstance(getattr(attn, "sinks", None), torch.Tensor):
            return f"its attention ({type(attn).__name__}) has attention sinks (s_aux), which streaming heads don't model"
    return None


def _layer_windows(model) -> list:
    """Sliding window of every decoder layer (None = full attention), as the masks apply it."""
    n = models.dims(model)["layers"]
    try:
        layout = models.attention_layout(model)
    except models.UnsupportedModelError:
        return [None] * n
    if layout.mode == "dict":
        types = getattr(models.text_config(model), "layer_types", None) or []
        return [layout.kinds.get(types[i]) if i < len(types) else None for i in range(n)]
    (window,) = layout.kinds.values()
    return [window] * n


# ---- the cache --------------------------------------------------------------------------------------------------


class DuoKV:
    """What :meth:`DuoLayer.update` returns in place of the key and value tensors: the layer itself, for the
    registered attention function (``hf_accel_duo``) to read both parts from."""

    __slots__ = ("layer",)

    def __init__(self, layer: "DuoLayer"):
        self.layer = layer

    def __repr__(self) -> str:
        return f"DuoKV({self.layer!r})"


def _repeat(t: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return t
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


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
        b, h, _, dk = key_states.shape
        if h != self.n_kv:
            raise ValueError(
                f"duo_attention: the pattern has {self.n_kv} KV heads for this layer but the model's keys have {h}"
            )
        dv = value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
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


class DuoCache(Cache):
    """A transformers Cache of :class:`DuoLayer` s, one per decoder layer (see the module docstring)."""

    def __init__(self, pattern: torch.Tensor, sink: int, recent: int, slack: int = 64, windows: list | None = None):
        pattern = torch.as_tensor(pattern, dtype=torch.bool)
        windows = windows or [None] * pattern.shape[0]
        super().__init__(layers=[DuoLayer(pattern[i], sink, recent, slack, windows[i]) for i in range(pattern.shape[0])])
        self.pattern = pattern

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        return sum(layer.full_nbytes() for layer in self.layers)

    @property
    def retrieval_share(self) -> float:
        return float(self.pattern.float().mean()) if self.pattern.numel() else 1.0


# ---- the attention and mask functions -----------------------------------------------------------------------------


def _allowed(mask, b: int, q: int, s: int, window, device) -> torch.Tensor:
    """(B, Q, S) bool: which of the S slots each query may see, from a 4D bool or additive mask (or causal)."""
    if mask is None:
        qi = torch.arange(s - q, s, device=device)[:, None]
        ki = torch.arange(s, device=device)[None, :]
        a = ki <= qi
        if window is not None:
            a = a & (ki > qi - window)
        return a[None].expand(b, -1, -1)
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise RuntimeError(f"duo_attention: per-head attention masks {tuple(mask.shape)} are not supported")
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.shape[-1] != s:
        raise RuntimeError(
            f"duo_attention: the attention mask {tuple(mask.shape)} does not cover the {s} slots this layer holds; "
            "a method that changes per-layer KV (layer skipping) can't run on a DuoCache"
        )
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive masks: 0 = allowed, min / -inf = not
    return mask.expand(b, q, s)


# cuDNN's attention (what torch picks for masked sdpa on Hopper) builds an execution plan per shape, and a decode
# step's KV length is new every step: ~3 ms per call. The other kernels take any length as it comes.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attend(q, k, v, mask, scaling, softcap, dropout=0.0):
    """Attention over already-repeated K/V: torch sdpa, or eager math (as transformers' eager) with a softcap."""
    if softcap is None:
        if q.device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        with sdpa_kernel(_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    w = torch.matmul(q, k.transpose(-1, -2)) * scale
    w = torch.tanh(w / softcap) * softcap
    if mask is not None:
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min) if mask.dtype == torch.bool else w + mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        w = F.dropout(w, p=dropout, training=True)
    return torch.matmul(w, v)


_PACK_MAX = 64  # up to this many queries, GQA folds the query groups into the query axis instead of repeating K/V


def _attend_gqa(q, k, v, mask, groups: int, scaling, softcap, dropout=0.0):
    """Attention of ``q`` (B, Hkv * groups, Q, D) over ``k``/``v`` (B, Hkv, S, D) with ``mask`` (B, 1, Q, S).
    Few queries (decode, tree verify): the ``groups`` query heads of a KV head are folded into the query axis
    (B, Hkv, groups * Q, D), so K/V are read as they are (no repeated copy); many queries: K/V are repeated."""
    b, hq, n, d = q.shape
    if groups == 1:
        return _attend(q, k, v, mask, scaling, softcap, dropout)
    if n > _PACK_MAX:
        return _attend(q, _repeat(k, groups), _repeat(v, groups), mask, scaling, softcap, dropout)
    hk = hq // groups
    folded = q.reshape(b, hk, groups * n, d)
    if mask is not None:
        mask = mask.expand(b, 1, n, mask.shape[-1])[:, :, None].expand(-1, -1, groups, -1, -1)
        mask = mask.reshape(b, 1, groups * n, mask.shape[-1])
    out = _attend(folded, k, v, mask, scaling, softcap, dropout)
    return out.reshape(b, hq, n, out.shape[-1])


def plain_attention(query, key, value, mask, scaling=None, softcap=None, window=None, dropout=0.0):
    """Ordinary attention over plain key/value tensors (a forward that is not on a DuoCache)."""
    s = key.shape[-2]
    g = query.shape[1] // key.shape[1]
    if mask is None:
        if query.shape[2] > 1 or window is not None:
            mask = _allowed(None, 1, query.shape[2], s, window, query.device)[:, None]
    elif mask.shape[-1] != s:
        mask = mask[..., -s:] if mask.shape[-1] > s else mask
    out = _attend_gqa(query, key, value, mask, g, scaling, softcap, dropout)
    return out.transpose(1, 2).contiguous(), None


def duo_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          **kwargs):
    """The ``hf_accel_duo`` attention implementation (transformers' AttentionInterface signature)."""
    if kwargs.get("s_aux") is not None:
        raise ValueError("duo_attention does not support attention sinks (s_aux)")
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    dropout = dropout if getattr(module, "training", False) else 0.0
    if isinstance(key, DuoKV):
        return key.layer.attend(query, attention_mask, scaling, softcap, window, dropout)
    return plain_attention(query, key, value, attention_mask, scaling, softcap, window, dropout)


def duo_mask(*args, **kwargs):
    """The ``hf_accel_duo`` mask implementation: transformers' sdpa mask, always materialised as a bool
    (B, 1, Q, KV) tensor (no ``is_causal`` shortcut), so that it carries padding, causality and windows."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    if AttentionInterface._global_mapping.get(ATTN_NAME) is not duo_attention_forward:
        AttentionInterface.register(ATTN_NAME, duo_attention_forward)
    if AttentionMaskInterface._global_mapping.get(ATTN_NAME) is not duo_mask:
        AttentionMaskInterface.register(ATTN_NAME, duo_mask)


# model -> [active requests, saved implementations]: the switch is shared by concurrent requests on one model and
# undone by the last one to finish (bookkeeping of the patch, not request state)
_SWITCHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SWITCH_LOCK = threading.Lock()


def _attn_configs(model) -> list:
    out, seen = [], set()
    for m in model.modules():
        cfg = getattr(m, "config", None) if isinstance(m, PreTrainedModel) else None
        for c in (cfg, getattr(cfg, "get_text_config", lambda: None)() if cfg is not None else None):
            if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
                seen.add(id(c))
                out.append(c)
    return out


@contextlib.contextmanager
def attention_switched(model):
    """Run the block with ``model``'s attention implementation set to ``hf_accel_duo``; the previous one is put
    back on exit (error or not) once no other request on the model is inside the block."""
    _register()
    with _SWITCH_LOCK:
        entry = _SWITCHED.get(model)
        if entry is None:
            saved = [(c, c._attn_implementation_internal) for c in _attn_configs(model)]
            for c, _ in saved:
                c._attn_implementation_internal = ATTN_NAME
            entry = _SWITCHED[model] = [0, saved]
        entry[0] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                for c, impl in entry[1]:
                    c._attn_implementation_internal = impl
                _SWITCHED.pop(model, None)


# ---- the method ---------------------------------------------------------------------------------------------------


@register(KIND)
class DuoAttention(KVMethod):
    """``accel="duo_attention"``: see the module docstring."""

    Config = DuoConfig
    lossless = False
    static_unsupported = (
        "its streaming heads keep a different, shrinking set of slots per row, which the static engine's one fixed "
        "slot buffer for every head does not carry."
    )

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
        self.windows = _layer_windows(model)

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

    def attention(self):
        return attention_switched(self.model)

    def finished(self, cache: DuoCache, stats) -> None:
        stats.kv_cache_bytes = cache.nbytes()
        stats.extra.update(
            retrieval_share=cache.retrieval_share,
            full_kv_bytes=cache.full_nbytes(),
            sink=self.sink,
            recent=self.recent,
            slack=self.slack,
            streaming_slots=max((layer.streaming_slots for layer in cache.layers), default=0),
            compactions=sum(layer.compactions for layer in cache.layers),
        )


__all__ = [
    "ATTN_NAME", "DuoAttention", "DuoCache", "DuoConfig", "DuoGates", "DuoKV", "DuoLayer", "KIND", "attention_switched",
    "default_pattern", "duo_attention_forward", "pattern_from_scores", "resolve_pattern",
]
