"""Model-agnostic access to HF causal LMs: the one place that knows model-family quirks.

Everything else in hf_accel asks this module for layers, embeddings, final norm, LM head (with its
post-processing) and for how a family wants its attention masks. Families covered by the test matrix:
Llama, Qwen2 (incl. sliding layers), Qwen3, Mistral (sliding window), Gemma2/3 (hybrid sliding/full,
logit softcap), Phi3, GPT-2, OPT. Other decoder-only families that follow the same conventions work
through the generic rules; a family that cannot work raises :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import contextlib

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


def is_dispatched(model) -> bool:
    """Spread by accelerate over several devices or offloaded to CPU/disk (``device_map``): such a model's
    forward moves weights or activations between devices inside hooks, which a CUDA graph can't capture."""
    devices = set(getattr(model, "hf_device_map", {}).values())
    return len(devices) > 1 or bool(devices & {"cpu", "disk"}) and model.device.type != "cpu"


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


@contextlib.contextmanager
def weights_loaded(module: nn.Module):
    """Inside the block, the weights of ``module`` are real tensors even where accelerate offloads them
    (``device_map`` with "cpu"/"disk": outside their own forward they are placeholders on the meta device). For
    code that reads a target's weights directly, e.g. to initialise a trained part from them."""
    hooked = []
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if getattr(h, "offload", False):
                hooked.append((m, h))
    for m, h in hooked:
        h.pre_forward(m)
    try:
        yield
    finally:
        for m, h in hooked:
            h.post_forward(m, None)


# ---- second models: draft / small / full-precision copies ------------------------------------------------------


def is_quantized(model) -> bool:
    """Weights quantized through a transformers quantizer (bitsandbytes, GPTQ, ...)."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None)


def compute_dtype(model) -> torch.dtype:
    """The dtype activations run in (a quantized model's non-quantized parts, else its own)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype not in (torch.uint8, torch.int8):
            return p.dtype
    return torch.float32


def companion(spec, like, method: str, what: str):
    """A second causal LM for a method (``spec``: a model, or a path loaded in ``like``'s compute dtype and device),
    checked to share ``like``'s vocabulary."""
    if spec is None:
        return None
    if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
        from transformers import AutoModelForCausalLM

        from .integrations import artifacts

        path = spec
        spec = artifacts.reused(  # loaded once per path and file version, not per request
            like, "companion", path,
            lambda: AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(like)).to(like.device).eval(),
        )
    if not isinstance(spec, nn.Module) or not hasattr(spec, "get_output_embeddings"):
        raise ValueError(f"accel={method!r}: {what} must be a causal LM or a path to one, got {type(spec).__name__}")
    vs, vl = spec.get_output_embeddings().weight.shape[0], like.get_output_embeddings().weight.shape[0]
    if vs != vl:
        raise ValueError(
            f"accel={method!r}: the {what}'s vocabulary ({vs}) differs from the model's ({vl}); the two must share a "
            "tokenizer"
        )
    return spec


def full_precision_copy(model, method: str):
    """The unquantized model a quantized one was loaded from (its own checkpoint, reloaded without the quantizer, in
    the compute dtype, on its device)."""
    from transformers import AutoModelForCausalLM

    if not is_quantized(model):
        raise ValueError(
            f"accel={method!r}: the model is not quantized, so its full-precision copy is the model itself: use "
            "intermediate='draft_model' (a smaller model in between) or intermediate='none'."
        )
    path = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""))
    qc = getattr(model.config, "quantization_config", None)
    qm = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    qm = str(getattr(qm, "value", qm))
    if not path or qm != "bitsandbytes":  # bnb quantizes on load: the checkpoint itself is full precision
        raise ValueError(
            f"accel={method!r}: can't rebuild a full-precision copy of this model (checkpoint {path or '?'} "
            f"quantized with {qm!r}): pass accel_kwargs full_model=<the unquantized model or its path>."
        )
    from .integrations import artifacts

    return artifacts.reused(  # once per target and checkpoint version, not per request
        model, "full_precision", path,
        lambda: AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(model)).to(model.device).eval(),
    )
