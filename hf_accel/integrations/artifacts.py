"""Trained parts (heads, transfer maps, adapters): one on-disk format for every method.

An artifact is a folder with ``model.safetensors`` (the trained tensors) and ``config.json``: the kind
(``clover``, ``hidden_transfer``, ...), the method's own settings, the base model's fingerprint and its hash
(models.config_fingerprint), and the command and metrics that made it. Loading an artifact for a base model
with another fingerprint is an error that names both.

Every way a folder can be unusable (missing, not a folder, config.json missing or not JSON, no kind or another
kind, another base model, weights file missing or damaged, settings of the wrong type or unknown, settings that
disagree with the tensors) is one ``ArtifactError`` naming the folder, the file and the fix, raised before the
request builds anything. A part passed as an object (``CloverHeads(...)``) in another dtype or device than the
model is used through a copy in the model's dtype and device (made once per object and weight version); the
object itself is left as it is.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
import typing
import weakref
from pathlib import Path

import torch

from .. import models

FORMAT = 1


class ArtifactError(ValueError):
    """An artifact folder can't be used: missing, damaged, of another kind, or made for another base model.
    The message names the folder, the file and the fix."""


def _retrain(kind: str | None) -> str:
    what = kind.replace("_", "-") if kind else "<method>"
    return f"train it again with `hf-accel train {what} --model <this model>` (or save it again with save_pretrained)"


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


def read_config(path, kind: str | None = None) -> dict:
    """The artifact's config.json as a dict (ArtifactError when the folder or the file is missing or unreadable)."""
    try:
        path = Path(path)
    except TypeError:
        raise ArtifactError(
            f"an hf_accel artifact is given as a folder path (str or os.PathLike) or as the trained object; got "
            f"{type(path).__name__}."
        ) from None
    cfg = path / "config.json"
    if path.exists() and not path.is_dir():
        raise ArtifactError(
            f"{str(path)!r} is a file, not an hf_accel artifact folder: pass the folder that holds config.json and "
            "model.safetensors (the one `hf-accel train ...` or save_pretrained wrote)."
        )
    if not cfg.exists():
        raise ArtifactError(
            f"no hf_accel artifact at {str(path)!r} (config.json missing): train one with `hf-accel train ...` "
            "or pass the folder it wrote."
        )
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(
            f"the artifact at {str(path)!r} is damaged: {cfg.name} is not valid JSON ({e}); {_retrain(kind)}."
        ) from None
    if not isinstance(meta, dict):
        raise ArtifactError(
            f"the artifact at {str(path)!r} is damaged: {cfg.name} holds a {type(meta).__name__}, not a JSON object; "
            f"{_retrain(kind)}."
        )
    return meta


def load(path, kind: str, model) -> tuple:
    """(tensors, meta) of the artifact at ``path``, checked against ``kind`` and ``model``."""
    from safetensors.torch import load_file

    meta = read_config(path, kind)
    found = meta.get("kind")
    if not found:
        raise ArtifactError(
            f"the artifact at {str(path)!r} names no kind (config.json has no 'kind' entry), so it is not an "
            f"hf_accel artifact or it was damaged; {kind} needs a {kind} artifact: {_retrain(kind)}."
        )
    if found != kind:
        raise ArtifactError(
            f"{str(path)!r} holds a {found!r} artifact, not {kind!r}: pass the folder `hf-accel train "
            f"{kind.replace('_', '-')}` wrote (or use it with accel={found!r})."
        )
    mine = config_hash(model)
    if meta.get("base_hash") != mine:
        raise ArtifactError(
            f"the {kind} artifact at {str(path)!r} was trained for another base model "
            f"({meta.get('base_name') or '?'}: {meta.get('base')}) than this one ({models.config_fingerprint(model)}). "
            f"Train one for this model: `hf-accel train {kind.replace('_', '-')} --model <this model>`."
        )
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise ArtifactError(
            f"the {kind} artifact at {str(path)!r} has no weights file (model.safetensors missing); copy the whole "
            f"folder, or {_retrain(kind)}."
        )
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own SafetensorError (truncated, bad header), or OSError
        raise ArtifactError(
            f"the {kind} artifact at {str(path)!r} is damaged: model.safetensors can't be read "
            f"({type(e).__name__}: {e}; a truncated or partly copied file?); copy it again, or {_retrain(kind)}."
        ) from None
    if not isinstance(meta.get("settings", {}), dict):
        raise ArtifactError(
            f"the {kind} artifact at {str(path)!r} is damaged: 'settings' in config.json must be a JSON object, got "
            f"{meta['settings']!r}; {_retrain(kind)}."
        )
    return tensors, meta


# model -> {(kind, path, mtime, dtype, device): module}: loaded trained parts are reused across requests
# (weights only; no request state lives in them)
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_POOL_LOCK = threading.Lock()
_KEY_LOCKS: dict = {}


def reused(model, kind: str, path, make, weights: str = "model.safetensors"):
    """``make()`` once per (model, kind, folder, version of its ``weights`` file, model dtype and device); later
    requests reuse what it returned (weights only: no request state may live in it)."""
    p = Path(path)
    stamp = (p / weights).stat().st_mtime_ns if (p / weights).exists() else None
    key = (kind, str(p.resolve()), stamp, str(model.dtype), str(model.device))
    with _POOL_LOCK:  # two requests (threads) asking for the same part load it once
        pool = _LOADED.setdefault(model, {})
        if key in pool:
            return pool[key]
        lock = _KEY_LOCKS.setdefault((id(model),) + key, threading.Lock())
    with lock:
        with _POOL_LOCK:
            if key in pool:
                return pool[key]
        value = make()
        with _POOL_LOCK:
            pool[key] = value
    return value


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
            return cls._build(model, meta.get("settings") or {}, tensors, where=f"the {cls.kind} artifact at "
                              f"{str(path)!r}")

        return cached_module(model, cls.kind, path, build)

    @classmethod
    def _build(cls, model, settings: dict, tensors: dict, where: str):
        """The part rebuilt from its settings and tensors, in the model's dtype and device, frozen. Settings and
        tensors are checked first (ArtifactError naming ``where`` and the problem)."""
        _check_settings(cls, settings, where)
        if cls.from_settings.__func__ is TrainedPart.from_settings.__func__:  # cls(model, **settings)
            params = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "model")]
            unknown = sorted(set(settings) - set(params))
            if unknown:
                raise ArtifactError(
                    f"{where}: config.json has unknown settings {unknown} (a {cls.__name__} takes {params}); it was "
                    f"written by another version or edited by hand: remove them, or {_retrain(cls.kind)}."
                )
        try:
            part = cls.from_settings(model, dict(settings))
        except (TypeError, ValueError) as e:
            raise ArtifactError(
                f"{where}: the settings {settings!r} can't build a {cls.__name__} for this model ({e}); "
                f"{_retrain(cls.kind)}."
            ) from None
        unknown = sorted(set(settings) - set(part.settings()))
        if unknown:
            raise ArtifactError(
                f"{where}: config.json has unknown settings {unknown} (a {cls.__name__} has "
                f"{sorted(part.settings())}); "
                f"it was written by another version or edited by hand: remove them, or {_retrain(cls.kind)}."
            )
        want = part.state_dict()
        problems = [f"{k} missing" for k in want if k not in tensors]
        problems += [f"{k} unexpected" for k in tensors if k not in want]
        problems += [
            f"{k}: {tuple(tensors[k].shape)} in model.safetensors, {tuple(want[k].shape)} for the settings"
            for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)
        ]
        if problems:
            shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
            raise ArtifactError(
                f"{where}: model.safetensors disagrees with the settings in config.json ({shown}): the two files come "
                f"from different trainings or one was edited; {_retrain(cls.kind)}."
            )
        part.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
        return part.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)


def _check_settings(cls, settings: dict, where: str) -> None:
    """Each setting's type against the constructor's annotation (the options' own check, config._matches)."""
    from ..config import _describe, _matches

    init = cls.__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that can't be resolved: leave the check to the constructor
        hints = {}
    params = inspect.signature(init).parameters
    for name, value in settings.items():
        if name in params and name in hints and not _matches(value, hints[name], None):
            raise ArtifactError(
                f"{where}: the setting {name!r} in config.json must be {_describe(hints[name], {})}, got {value!r} "
                f"({type(value).__name__}); the file was edited or damaged: fix it, or {_retrain(cls.kind)}."
            )


# part object -> {(dtype, device): (weights version, copy)}: a part given as an object in another dtype or device
# than its model, copied once per weight version (the user's object is left as it is)
_CAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CAST_LOCK = threading.Lock()


def _in_place_for(part, model) -> bool:
    tensors = list(part.parameters()) + list(part.buffers())
    return all(t.device == model.device and (not t.is_floating_point() or t.dtype == model.dtype) for t in tensors)


def part_from(value, cls, model, method: str):
    """The trained part a method got in accel_kwargs: an instance of ``cls`` built for ``model``, or an artifact
    folder (loaded with ``cls.from_pretrained``). An instance in another dtype or device than the model (e.g.
    built in float32 for a bfloat16 model) is used through a frozen copy in the model's dtype and device, made
    once per instance and version of its weights; the instance itself is not changed."""
    if isinstance(value, cls):
        if value.base is not model:
            raise ValueError(f"accel={method!r}: the {cls.__name__} given was built for another model object")
        if _in_place_for(value, model):
            return value
        state = value.state_dict()
        version = tuple((t.data_ptr(), t._version) for t in state.values())
        key = (str(model.dtype), str(model.device))
        with _CAST_LOCK:
            entry = _CAST.setdefault(value, {}).get(key)
            if entry is None or entry[0] != version:
                copy = cls._build(model, value.settings(), {k: v.detach() for k, v in state.items()},
                                  where=f"accel={method!r}: the {cls.__name__} given")
                entry = (version, copy)
                _CAST[value][key] = entry
        return entry[1]
    if not isinstance(value, str) and not hasattr(value, "__fspath__"):
        raise ValueError(
            f"accel={method!r}: the trained part must be a {cls.__name__} or the path of an artifact folder "
            f"(`hf-accel train {cls.kind.replace('_', '-')}`), got {type(value).__name__}."
        )
    return cls.from_pretrained(value, model)


def missing(value, cls, what: str) -> str | None:
    """Why ``value`` (accel_kwargs entry) can't serve as the trained part, or None (for ``missing_artifacts``)."""
    if value is None:
        return f"no {what}"
    if not isinstance(value, cls):
        try:
            read_config(value, cls.kind)
        except ArtifactError as e:
            return str(e)
    return None
