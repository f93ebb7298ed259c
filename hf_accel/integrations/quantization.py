"""Quantized targets (bitsandbytes, GPTQ through gptqmodel/optimum, anything loaded through a transformers quantizer):
whether a model is quantized, the dtype its activations run in, and its full-precision copy.

bitsandbytes and gptqmodel are optional (``pip install hf-accel[quant]``); nothing here imports them: transformers
does, when a quantized checkpoint is loaded."""

from __future__ import annotations

import torch

from . import artifacts


def is_quantized(model) -> bool:
    """Weights quantized through a transformers quantizer (bitsandbytes, GPTQ, ...)."""
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None)


def compute_dtype(model) -> torch.dtype:
    """The dtype activations run in (a quantized model's non-quantized parts, else its own)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype not in (torch.uint8, torch.int8):
            return p.dtype
    return torch.float32


def quant_method(model) -> str:
    """The quantizer's name from the model's ``quantization_config`` ('bitsandbytes', 'gptq', ...; 'None' if none)."""
    qc = getattr(model.config, "quantization_config", None)
    qm = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(qm, "value", qm))


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
    qm = quant_method(model)
    if not path or qm != "bitsandbytes":  # bnb quantizes on load: the checkpoint itself is full precision
        raise ValueError(
            f"accel={method!r}: can't rebuild a full-precision copy of this model (checkpoint {path or '?'} "
            f"quantized with {qm!r}): pass accel_kwargs full_model=<the unquantized model or its path>."
        )
    return artifacts.reused(  # once per target and checkpoint version, not per request
        model, "full_precision", path,
        lambda: AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(model)).to(model.device).eval(),
    )
