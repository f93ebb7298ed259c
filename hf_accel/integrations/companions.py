"""Second models a method runs next to the target (EAD's small model, quant_spec's draft / intermediate / full
model): given as a model object or a path, loaded once per path and file version, checked to share the target's
vocabulary."""

from __future__ import annotations

from torch import nn

from . import artifacts
from .quantization import compute_dtype


def companion(spec, like, method: str, what: str):
    """A second causal LM for a method (``spec``: a model, or a path loaded in ``like``'s compute dtype and device),
    checked to share ``like``'s vocabulary."""
    if spec is None:
        return None
    if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
        from transformers import AutoModelForCausalLM

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
