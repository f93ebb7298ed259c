"""Trained parts (heads, transfer maps, adapters): one on-disk format for every method.

An artifact is a folder with ``model.safetensors`` (the trained tensors) and ``config.json``: the kind
(``clover``, ``hidden_transfer``, ...), the method's own settings, the base model's fingerprint and its hash
(models.config_fingerprint), and the command and metrics that made it. Loading an artifact for a base model
with another fingerprint is an error that names both.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch

from . import models

FORMAT = 1


class ArtifactError(ValueError):
    """An artifact is missing, of another kind, or made for another base model."""


def config_hash(model) -> str:
    blob = json.dumps(models.config_fingerprint(model), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save(path, kind: str, state_dict: dict, settings: dict, model, metrics: dict | None = None,
         command: str | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    save_file(tensors, str(path / "model.safetensors"))
    meta = dict(
        kind=kind, format=FORMAT, settings=settings, base=models.config_fingerprint(model),
        base_hash=config_hash(model), base_name=str(getattr(model.config, "_name_or_path", "")),
        metrics=metrics or {}, command=command, stored_dtype=str(dtype).replace("torch.", ""),
    )
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_config(path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.exists():
        raise ArtifactError(
            f"no hf_accel artifact at {str(path)!r} (config.json missing): train one with `hf-accel train ...` "
            "or pass the folder it wrote."
        )
    return json.loads(cfg.read_text())


def load(path, kind: str, model) -> tuple:
    """(tensors, meta) of the artifact at ``path``, checked against ``kind`` and ``model``."""
    from safetensors.torch import load_file

    meta = read_config(path)
    if meta.get("kind") != kind:
        raise ArtifactError(f"{str(path)!r} holds a {meta.get('kind')!r} artifact, not {kind!r}.")
    mine = config_hash(model)
    if meta.get("base_hash") != mine:
        raise ArtifactError(
            f"the {kind} artifact at {str(path)!r} was trained for another base model "
            f"({meta.get('base_name') or '?'}: {meta.get('base')}) than this one ({models.config_fingerprint(model)}). "
            f"Train one for this model: `hf-accel train {kind.replace('_', '-')} --model <this model>`."
        )
    return load_file(str(Path(path) / "model.safetensors")), meta


# model -> {(kind, path, mtime, dtype, device): module}: loaded trained parts are reused across requests
# (weights only; no request state lives in them)
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reused(model, kind: str, path, make, weights: str = "model.safetensors"):
    """``make()`` once per (model, kind, folder, version of its ``weights`` file, model dtype and device); later
    requests reuse what it returned (weights only: no request state may live in it)."""
    p = Path(path)
    stamp = (p / weights).stat().st_mtime_ns if (p / weights).exists() else None
    key = (kind, str(p.resolve()), stamp, str(model.dtype), str(model.device))
    pool = _LOADED.setdefault(model, {})
    if key not in pool:
        pool[key] = make()
    return pool[key]


def cached_module(model, kind: str, path, build):
    """``build(tensors, meta)`` once per (model, artifact file version); later calls reuse the module."""
    return reused(model, kind, path, lambda: build(*load(Path(path), kind, model)))


class TrainedPart:
    """Mixin for a method's trained ``nn.Module`` built for one base model (``self.base``): set ``kind``; define
    ``settings()``, the constructor keyword arguments that rebuild it. Gives ``save_pretrained`` and a cached
    ``from_pretrained`` (weights loaded once per model and file version, in the model's dtype and device)."""

    kind: str = ""

    def settings(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def from_settings(cls, model, settings: dict):
        return cls(model, **settings)

    def save_pretrained(self, path, metrics=None, command=None):
        return save(path, self.kind, self.state_dict(), self.settings(), self.base, metrics, command)

    @classmethod
    def from_pretrained(cls, path, model):
        def build(tensors, meta):
            part = cls.from_settings(model, meta["settings"])
            part.load_state_dict({k: v.float() for k, v in tensors.items()})
            return part.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)

        return cached_module(model, cls.kind, path, build)


def part_from(value, cls, model, method: str):
    """The trained part a method got in accel_kwargs: an instance of ``cls`` built for ``model``, or an artifact
    folder (loaded with ``cls.from_pretrained``)."""
    if isinstance(value, cls):
        if value.base is not model:
            raise ValueError(f"accel={method!r}: the {cls.__name__} given was built for another model object")
        return value
    return cls.from_pretrained(value, model)


def missing(value, cls, what: str) -> str | None:
    """Why ``value`` (accel_kwargs entry) can't serve as the trained part, or None (for ``missing_artifacts``)."""
    if value is None:
        return f"no {what}"
    if not isinstance(value, cls):
        try:
            read_config(value)
        except ArtifactError as e:
            return str(e)
    return None
