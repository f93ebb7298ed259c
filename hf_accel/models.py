"""Model-agnostic access to HF causal LMs: layers, embeddings, final norm, LM head (with its post-processing), the
attention masks a family wants, the shapes trained parts need, accelerate placement.

Everything else in hf_accel asks this module. The family-specific rules behind it live in ``hf_accel/patches/``
(families.py: naming, logits, masks, shapes; attention.py: attention implementation switches); quantization and
second models in ``hf_accel/integrations/``.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .patches.families import (  # noqa: F401  (the interface hf_accel uses)
    UnsupportedModelError,
    AttentionLayout,
    text_config,
    model_type,
    check_causal_lm,
    decoder,
    layers,
    embed_tokens,
    last_position,
    final_norm,
    lm_head,
    logits_from_hidden,
    attention_layout,
    accepts_logits_to_keep,
    cache_kwarg,
    dims,
    config_fingerprint,
    layer_mlp,
    attention_weights,
    layer_output_hidden,
    replace_layer_output,
    norm_weight_is_plain,
    projections,
    linear_dims,
    config_with_layers,
    attention_module,
    attention_interface_unsupported,
    layer_windows,
    eager_attention_of,
    FULL,
    SLIDING,
    TESTED_FAMILIES,
)


def is_dispatched(model) -> bool:
    """Spread by accelerate over several devices or offloaded to CPU/disk (``device_map``): such a model's
    forward moves weights or activations between devices inside hooks, which a CUDA graph can't capture."""
    devices = set(getattr(model, "hf_device_map", {}).values())
    return len(devices) > 1 or bool(devices & {"cpu", "disk"}) and model.device.type != "cpu"


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
