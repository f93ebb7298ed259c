"""Model-family quirks: how each family of HF causal LMs names its layers, norms and heads, post-processes its
logits, and wants its attention masks; what trained parts need to know about its shapes. The one place that knows
family differences (with patches/attention.py for attention implementations); ``hf_accel.models`` re-exports it as
the model-agnostic interface the rest of hf_accel uses.

Families covered by the test matrix: Llama, Qwen2 (incl. sliding layers), Qwen3, Mistral (sliding window),
Gemma2/3 (hybrid sliding/full, logit softcap), Phi3, GPT-2, OPT. Other decoder-only families that follow the same
conventions work through the generic rules; a family that cannot work raises :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

FULL = "full_attention"
SLIDING = "sliding_attention"

#: families checked by the test matrix (tiny random models of each, both transformers versions)
TESTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt2", "opt")

# Attention-mask quirks, read from transformers 5.17 - 5.23 modeling code:
# * "dict" families build one mask per layer type and accept a ready dict
#   ({"full_attention": m, "sliding_attention": m}) in place of attention_mask;
# * "single" families take one mask for every layer; some of them (Mistral, Phi3) apply the sliding window
#   of config.sliding_window to every layer when it is set.
_SINGLE_SLIDING_FAMILIES = {"mistral", "phi3", "mixtral", "starcoder2"}


class UnsupportedModelError(ValueError):
    """The model can't be driven by hf_accel; the message says why and what to do."""


@dataclass(frozen=True)
class AttentionLayout:
    """How to give this model attention masks.

    ``kinds`` maps each layer type in use to its sliding window (None = full attention).
    ``mode`` is "dict" (pass {layer_type: 4D mask}) or "single" (one 4D mask for all layers).
    """

    kinds: dict
    mode: str

    def window_of_single(self):
        assert self.mode == "single"
        (w,) = self.kinds.values()
        return w


def text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def model_type(model) -> str:
    return getattr(text_config(model), "model_type", type(model).__name__)


def check_causal_lm(model) -> None:
    """Raise a clear error for models hf_accel cannot accelerate."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"accel= needs a decoder-only causal LM, but {type(model).__name__} is an encoder-decoder model. "
            "Call generate() without accel= for this model."
        )
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"accel= needs a causal LM with a language-modeling head; {type(model).__name__} has none. "
            "Load the model with AutoModelForCausalLM."
        )
    base = decoder(model)
    if base is None or not hasattr(base, "forward"):
        raise UnsupportedModelError(
            f"hf_accel can't find the decoder of {type(model).__name__}. Supported families: "
            f"{', '.join(TESTED_FAMILIES)} and others built the same way."
        )


def decoder(model) -> nn.Module:
    """The base (decoder) model under the LM head."""
    if hasattr(model, "get_decoder"):
        try:
            dec = model.get_decoder()
            if dec is not None:
                return dec
        except (AttributeError, NotImplementedError):
            pass
    for name in ("model", "transformer", "gpt_neox"):
        if hasattr(model, name):
            return getattr(model, name)
    return None


def layers(model) -> nn.ModuleList:
    """The decoder layers, whatever the family calls them."""
    base = decoder(model)
    for path in ("layers", "h", "decoder.layers", "blocks"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UnsupportedModelError(f"hf_accel can't find the decoder layers of {type(model).__name__}.")


def embed_tokens(model) -> nn.Module:
    return model.get_input_embeddings()


def last_position(model) -> int | None:
    """The last position a learned absolute-position table holds (GPT-2's ``wpe``: n_positions - 1; OPT's
    ``embed_positions``, minus its offset: max_position_embeddings - 1), or None where positions are computed
    (rotary, ALiBi) and any position is valid. Tokens no one sees (padding, drafts past max_length) must not sit
    beyond it."""
    base = decoder(model)
    for name in ("wpe", "embed_positions"):
        table = getattr(base, name, None)
        if isinstance(table, nn.Embedding):
            return int(table.num_embeddings) - int(getattr(table, "offset", 0) or 0) - 1
    return None


def final_norm(model) -> nn.Module | None:
    base = decoder(model)
    for path in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def lm_head(model) -> nn.Module:
    return model.get_output_embeddings()


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM head with the family's post-processing (Gemma softcap, Cohere logit_scale, Granite scaling)."""
    cfg = text_config(model)
    logits = lm_head(model)(hidden)
    scale = getattr(cfg, "logit_scale", None)
    if scale is not None and model_type(model) == "cohere":
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _forward_source(model) -> str:
    return _source_of(type(decoder(model)))


@lru_cache(maxsize=None)
def _source_of(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def attention_layout(model) -> AttentionLayout:
    """Which masks a family wants, read from its config and (once per class) its forward's source."""
    cfg = text_config(model)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    src = _forward_source(model)
    accepts_dict = "causal_mask_mapping := attention_mask" in src
    if layer_types is not None:
        used = set(layer_types)
        unknown = used - {FULL, SLIDING}
        if unknown:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses attention layer types {sorted(unknown)}, which hf_accel does not "
                "support yet. Call generate() without accel= for this model."
            )
        if accepts_dict:
            return AttentionLayout({t: (window if t == SLIDING else None) for t in used}, "dict")
        if used == {SLIDING}:
            return AttentionLayout({SLIDING: window}, "single")
        if used == {FULL} and not _single_mask_is_sliding(model, src, window):
            return AttentionLayout({FULL: None}, "single")
        if used != {FULL}:
            raise UnsupportedModelError(
                f"{type(model).__name__} mixes sliding and full attention layers but does not accept per-type "
                "masks; hf_accel can't drive it. Call generate() without accel=."
            )
    if _single_mask_is_sliding(model, src, window):
        return AttentionLayout({SLIDING: window}, "single")
    return AttentionLayout({FULL: None}, "single")


def _single_mask_is_sliding(model, src: str, window) -> bool:
    if window is None:
        return False
    return model_type(model) in _SINGLE_SLIDING_FAMILIES or (
        "create_sliding_window_causal_mask" in src and "causal_mask_mapping" not in src
    )


def accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache under: ``cache`` from transformers 5.24 (where
    ``past_key_values`` still works but warns), ``past_key_values`` before and for models that don't know ``cache``.
    Read once per request, outside compiled code."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---- what trained parts (heads, transfer maps, adapters) need to know about a family ----------------------


def dims(model) -> dict:
    """Hidden size, attention heads, KV heads, head dim, layer count and RoPE base, whatever the family calls them."""
    cfg = text_config(model)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    rope = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None)
    if rope is None and isinstance(params, dict):
        rope = params.get("rope_theta") or (params.get("full_attention") or {}).get("rope_theta")
    eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_epsilon", None) or 1e-6
    return dict(hidden=int(hidden), heads=int(heads), kv_heads=int(kv), head_dim=int(head_dim),
                layers=len(layers(model)), rope_theta=float(rope or 10000.0), eps=float(eps))


def config_fingerprint(model) -> dict:
    """The base-model facts a trained artifact depends on (saved with it and checked on load)."""
    cfg = text_config(model)
    d = dims(model)
    return dict(model_type=model_type(model), vocab_size=int(cfg.vocab_size), hidden_size=d["hidden"],
                num_layers=d["layers"], num_heads=d["heads"], num_kv_heads=d["kv_heads"], head_dim=d["head_dim"],
                intermediate_size=int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "ffn_dim", 0) or 0))


def layer_mlp(layer: nn.Module):
    """A decoder layer's feed-forward block as one callable module (``mlp``), or None if the family splits it."""
    mlp = getattr(layer, "mlp", None)
    return mlp if isinstance(mlp, nn.Module) else None


def attention_weights(layer: nn.Module, heads: int, kv_heads: int, head_dim: int, hidden: int):
    """The (q, k, v, o) Linear modules of a Llama-style attention block with the given shapes, or None
    (fused or differently named projections: the caller initialises its own)."""
    attn = getattr(layer, "self_attn", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    mods = [getattr(attn, n, None) for n in names] if attn is not None else [None]
    if any(not isinstance(m, nn.Linear) for m in mods):
        return None
    q, k, v, o = mods
    if (q.weight.shape != (heads * head_dim, hidden) or k.weight.shape != (kv_heads * head_dim, hidden)
            or v.weight.shape != (kv_heads * head_dim, hidden) or o.weight.shape != (hidden, heads * head_dim)):
        return None
    return q, k, v, o


def layer_output_hidden(output):
    """A decoder layer's output hidden states (families return a tensor or a tuple starting with it)."""
    return output[0] if isinstance(output, tuple) else output


def replace_layer_output(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def norm_weight_is_plain(model) -> bool:
    """Whether the family's RMSNorm weight multiplies directly (Gemma stores weight - 1: copying it into a plain
    RMSNorm would be wrong)."""
    return not model_type(model).startswith("gemma")


def projections(model) -> list:
    """(name, module) of every projection inside the decoder layers (nn.Linear, GPT-2's Conv1D), in order: where
    low-rank adapters attach. Names are the model's own (``named_modules``)."""
    from transformers.pytorch_utils import Conv1D

    inside = {id(m) for layer in layers(model) for m in layer.modules()}
    return [(n, m) for n, m in model.named_modules() if id(m) in inside and isinstance(m, (nn.Linear, Conv1D))]


def linear_dims(mod: nn.Module) -> tuple:
    """(in_features, out_features) of a projection: nn.Linear, or GPT-2's Conv1D (which stores its weight (in, out))."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    return mod.weight.shape[0], mod.weight.shape[1]


# ---- a config with fewer layers (draft models made from the target) ------------------------------------------------

_LAYER_COUNT = ("num_hidden_layers", "n_layer", "num_layers")
_PER_LAYER = ("layer_types",)


def config_with_layers(model, keep: list):
    """A copy of ``model.config`` for a model made of the target's layers ``keep`` (indices, in order): the layer
    count, per-layer settings (``layer_types``) and Qwen2's ``max_window_layers`` follow the layers kept."""
    n_target = len(layers(model))
    cfg = copy.deepcopy(model.config)
    tc = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    name = next((a for a in _LAYER_COUNT if isinstance(getattr(tc, a, None), int)), None)
    if name is None:
        raise UnsupportedModelError(f"can't find the layer count in {type(tc).__name__}")
    setattr(tc, name, len(keep))
    for attr in _PER_LAYER:
        value = getattr(tc, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n_target:
            setattr(tc, attr, [value[i] for i in keep])
    if getattr(tc, "max_window_layers", None) is not None:  # Qwen2: layers >= max_window_layers slide
        tc.max_window_layers = sum(1 for i in keep if i < tc.max_window_layers)
    return cfg


# ---- attention modules ----------------------------------------------------------------------------------------------


def attention_module(layer: nn.Module):
    """A decoder layer's self-attention module, whatever the family calls it (None if none is found)."""
    for name in ("self_attn", "attn", "self_attention", "attention"):
        m = getattr(layer, name, None)
        if isinstance(m, nn.Module):
            return m
    for m in layer.children():
        if "attention" in type(m).__name__.lower():
            return m
    return None


def attention_interface_unsupported(model, sinks: bool = False) -> str | None:
    """Why ``model``'s attention can't be replaced through transformers' AttentionInterface (None: it can): every
    layer's attention must look its implementation up there (so that a registered implementation and a custom cache
    reach it); with ``sinks=False`` attention sinks (``s_aux``, GPT-OSS) count as a reason too."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return "its attention does not go through transformers' AttentionInterface"
    for layer in layers(model):
        attn = attention_module(layer)
        if attn is None:
            return "no attention module was found in its decoder layers"
        src = _source_of(type(attn))
        if "ALL_ATTENTION_FUNCTIONS" not in src and "attention_interface" not in src:
            return f"its attention ({type(attn).__name__}) does not go through transformers' AttentionInterface"
        if not sinks and ("s_aux" in src or isinstance(getattr(attn, "sinks", None), torch.Tensor)):
            return f"its attention ({type(attn).__name__}) has attention sinks (s_aux), which streaming heads don't model"
    return None


def layer_windows(model) -> list:
    """Sliding window of every decoder layer (None = full attention), as the family's masks apply it."""
    n = len(layers(model))
    try:
        layout = attention_layout(model)
    except UnsupportedModelError:
        return [None] * n
    if layout.mode == "dict":
        types = getattr(text_config(model), "layer_types", None) or []
        return [layout.kinds.get(types[i]) if i < len(types) else None for i in range(n)]
    (window,) = layout.kinds.values()
    return [window] * n


def eager_attention_of(module: nn.Module):
    """The family's own eager attention function for an attention module (each modeling file defines one: Gemma's
    applies its softcap, GPT-2's its scaling rules), or None."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
