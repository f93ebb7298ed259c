"""DuoAttention's attention: the ``hf_accel_duo`` implementation (AttentionInterface / AttentionMaskInterface
signatures) and the kernels :class:`~.cache.DuoLayer` attends with. It runs only inside a duo request's thread:
``SWITCH`` (patches/attention.py) dispatches every other forward on the model to the model's own implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.masking_utils import sdpa_mask

from ...patches.attention import Switch
from .static_cache import StaticDuoKV

ATTN_NAME = "hf_accel_duo"  # the attention (and mask) implementation a duo request's model is switched to


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
    if isinstance(key, StaticDuoKV):
        return key.layer.attend(key, query, attention_mask, scaling, softcap, window, dropout)
    return plain_attention(query, key, value, attention_mask, scaling, softcap, window, dropout)


def duo_mask(*args, **kwargs):
    """The ``hf_accel_duo`` mask implementation: transformers' sdpa mask, always materialised as a bool
    (B, 1, Q, KV) tensor (no ``is_causal`` shortcut), so that it carries padding, causality and windows."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


SWITCH = Switch(ATTN_NAME, duo_attention_forward, duo_mask)


def attention_switched(model):
    """Context manager: ``model``'s attention implementation is ``hf_accel_duo`` inside the block (forwards that are
    not part of a duo request of their own thread still run the model's original implementation)."""
    return SWITCH.switched(model)


def duo_request(model):
    """Context manager around one duo request on ``model`` in this thread (the switch, and this thread's forwards
    on the model dispatched to :func:`duo_attention_forward`)."""
    return SWITCH.request(model)
