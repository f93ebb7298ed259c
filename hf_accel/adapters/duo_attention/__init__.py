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
``AttentionInterface`` and ``AttentionMaskInterface`` once, as a per-thread dispatcher: patches/attention.py) for the
duration of the call only; it is put back on exit, error or not, and nothing else on the model changes. Forwards
that are not part of a duo request of their own thread (a plain generate or another method in another thread) are
dispatched to the model's original implementation, so they compute exactly what they would without the switch. ``DuoCache.update`` returns a :class:`DuoKV` container (not
tensors) that the registered attention function recognises; called with plain tensors inside a duo request (HF's
CFG pass) the same function computes ordinary attention (scaling, softcap, sliding windows
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
slots its own layer holds, and the engine's narrowed masks match it), and on the static engine (tree methods).
Refused with a ValueError: beam search,
assistant models / prompt lookup (they crop the cache), a user ``past_key_values``, ``cache_implementation``
other than dynamic or static (offloaded / sliding_window / ...), a layer-skipping method on the static engine, models whose attention does
not go through the AttentionInterface (Falcon, Bloom, ...), models with attention sinks (``s_aux``, GPT-OSS),
``sink < 0``, ``recent < 1``, a pattern of the wrong shape or dtype.

Static. ``cache_implementation="static"`` (duo_attention alone) runs HF's generate on a :class:`StaticDuoCache`
(static_cache.py): retrieval heads in fixed ``max_cache_len`` buffers, streaming heads in fixed sink + recent rings,
same rank rule, so it gives the dynamic DuoCache's tokens; it is compileable, so HF compiles the decode step on it
exactly as on its own StaticCache (``GenerationMixin._valid_auto_compile_criteria``: a compileable, non-Dynamic cache
on a GPU, unless ``disable_compile``): the decode step is one graph with fixed shapes, no host read, no branch on
tensor values (the prefill, and the forwards of HF's chunked prefill, run the several-token path eagerly).
``max_cache_len`` (accel_kwargs; default prompt + ``max_new_tokens``): one value across calls reuses the compiled
step. ``static_kernel``: the decode attention, ``"math"`` (default: two matmuls and a float32 softmax, which split
over the slots) or ``"sdpa"``. KV bytes: the buffers'. Composed with a speculative method,
``cache_implementation="static"`` runs hf_accel's static engine on an :class:`EngineDuoCache` (engine_cache.py):
retrieval heads in the engine's slot buffers, streaming heads in sink + recent rings with per-entry positions and a
scratch for the verify's nodes; each tree node sees what duo_attention alone would see for its token (the rule is
positional there: sinks, entries at positions > its own - recent, its ancestors), and the accepted path is appended
to the rings by the engine's compaction; both fixed-shape device work (captured as CUDA graphs). Layer-skipping
methods (layer plans: LoRA-Drop, M2R2 early exit) are refused there: a skipped layer writes no KV to append.

Runner (``runner`` option, duo_attention alone with ``cache_implementation="static"``). On this model class HF's
compiled decode step is bound by its per-token host work, not by the KV it reads (the default model at 8k context:
~3.3 ms a token for ~0.04 ms of KV reads on an H200), so the smaller KV buys no speed there. ``"auto"`` (default) runs
the call on the static engine instead, where its steps are CUDA graphs (a GPU, compile not disabled, one device) and
the call asks nothing the engine refuses: :class:`~hf_accel.engine.adapter.NoDraft` (one token per step) on an
EngineDuoCache, one captured verify + one captured ring append per token and one host read; the same tokens as
the StaticDuoCache (both are duo_attention alone's rule). Otherwise (CPU, ``disable_compile``, CFG, ...) HF's
generate on the StaticDuoCache, as above. ``"engine"`` forces the engine (an error names what it refuses),
``"hf"`` HF's generate. ``stats(out).extra["runner"]`` says which ran; the engine's output object carries no cache
(``past_key_values`` None, as for every method on the engine). The engine prefills a KV method's cache in
chunks of queries (backends.KV_PREFILL_ENTRIES: bounded masks at long contexts; the rings carry across chunks).

Layout (as peft splits a method): config.py (DuoConfig), gates.py (DuoGates, patterns), cache.py (DuoCache,
DuoLayer, eviction), static_cache.py (StaticDuoCache), engine_cache.py (EngineDuoCache), attention.py (the attention / mask functions and their switch), method.py (the registered
method).
"""

from __future__ import annotations

from .attention import (
    ATTN_NAME, SWITCH, DuoKV, attention_switched, duo_attention_forward, duo_mask, duo_request, plain_attention,
)
from .cache import DuoCache, DuoLayer
from .config import DuoConfig
from .engine_cache import EngineDuoCache, EngineDuoLayer
from .gates import KIND, DuoGates, default_pattern, pattern_from_scores, resolve_pattern
from .method import DuoAttention, unsupported_reason
from .static_cache import StaticDuoCache, StaticDuoLayer


__all__ = [
    "ATTN_NAME", "DuoAttention", "DuoCache", "DuoConfig", "DuoGates", "DuoKV", "DuoLayer", "KIND", "SWITCH",
    "StaticDuoCache", "StaticDuoLayer", "EngineDuoCache", "EngineDuoLayer",
    "attention_switched", "default_pattern", "duo_request", "unsupported_reason", "duo_attention_forward", "pattern_from_scores", "resolve_pattern",
]