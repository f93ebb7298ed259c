"""Loading what a command runs on: model, tokenizer, dtype, quantization, the default model and its committed
trained parts, and the default ADED datastore. The CLI, the bench and train suites and the scripts import this
module (it imports none of them), so model loading has one home and no import circle.

Heavy imports (torch, transformers) happen inside the functions: importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

from .default_model import NAME as DEFAULT_NAME
from .default_model import artifacts_dir, default_accel_kwargs, default_artifact, load_default

DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
QUANTIZE = ("none", "nf4", "int8")


def torch_dtype(dtype):
    """``torch.float32`` etc. for a CLI spelling (fp32, bf16, fp16 or the long names); a torch dtype passes through."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return table[dtype]


def quantization(quantize: str | None, dtype):
    """A bitsandbytes config for --quantize (None for none): NF4 4-bit computing in ``dtype``, or LLM.int8."""
    if quantize in (None, "none"):
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZE)}")
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch_dtype(dtype))
    return BitsAndBytesConfig(load_in_8bit=True)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str | None) -> str:
    """``"auto"``/None -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given."""
    if device in (None, "auto"):
        return "cuda" if cuda_available() else "cpu"
    return device


def load_model(name: str, dtype="fp32", device: str = "cpu", quantize: str | None = None):
    """(model, tokenizer) in eval mode; ``name`` ``"default"`` is the default model (offline, see
    :func:`load_default`), anything else a path or Hub id for ``AutoModelForCausalLM``. The tokenizer pads on
    the left. ``quantize``: none, nf4 or int8 (bitsandbytes)."""
    dt = torch_dtype(dtype)
    device = resolve_device(device)
    qc = quantization(quantize, dt)
    if name == "default":
        return load_default(dtype=dt, device=device, quantization_config=qc)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"
    if qc is not None:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, quantization_config=qc, device_map=device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt).to(device).eval()
    return model, tok


def model_label(name: str) -> str:
    """How a --model value is written in reports."""
    return f"{DEFAULT_NAME} (default)" if name == "default" else name


# ---- the ADED datastore of a model ------------------------------------------------------------------------------


def default_datastore_path(model, tok) -> Path:
    """Where the ShareGPT trigram store for ``tok`` lives in the cache (keyed by the tokenizer's hash)."""
    from .data.trigram import default_path, tokenizer_hash

    return default_path(tokenizer_hash(tok))


def register_datastore(model, path) -> None:
    """Note in the datastore index that ``path`` serves ``model`` (by its name_or_path and its architecture
    fingerprint), so ``datastore="auto"`` finds it even when the model was saved and reloaded elsewhere without
    its tokenizer."""
    from .data import trigram
    from .models import config_fingerprint

    name = str(getattr(model.config, "_name_or_path", "") or "")
    trigram.register(path, [k for k in (name, trigram.config_key(config_fingerprint(model))) if k])


def ensure_default_datastore(model, tok, limit=None, progress: bool = True) -> Path:
    """Path of the ShareGPT datastore for this tokenizer, building it (with a progress bar) if missing."""
    from .data.trigram import build_from_sharegpt

    path = default_datastore_path(model, tok)
    if not path.exists():
        print(f"building the ShareGPT trigram datastore for this tokenizer (once, ~1 minute) -> {path}", flush=True)
        build_from_sharegpt(tok, limit=limit, progress=progress).save(path)
    register_datastore(model, path)
    return path


__all__ = ["DTYPES", "QUANTIZE", "DEFAULT_NAME", "torch_dtype", "quantization", "cuda_available", "resolve_device",
           "load_model", "load_default", "model_label", "artifacts_dir", "default_artifact", "default_accel_kwargs",
           "default_datastore_path", "register_datastore", "ensure_default_datastore"]
