"""Method configuration: the AccelConfig base dataclass, and where a request's method comes from.

A method is chosen, in this order, by ``generate(accel=..., accel_kwargs=...)``, by the ``hf_accel`` entry
of the GenerationConfig passed to generate, or by the ``hf_accel`` entry of the model's own
generation_config. The entry is one JSON-serialisable dict, ``{"method": "aded", **method_kwargs}``,
namespaced so that it can't clash with a future transformers field and survives save/load.

A composition of a KV method and a speculative method names both, with one dict of options per method:
``accel=["duo_attention", "aded"], accel_kwargs={"duo_attention": {...}, "aded": {...}}``, or the entry
``{"method": ["duo_attention", "aded"], "duo_attention": {...}, "aded": {...}}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields

from .registry import method_of

KEY = "hf_accel"
VANILLA = {"none", "vanilla", "off"}


@dataclass
class AccelConfig:
    """Base of every method's config dataclass (one per adapter, at the top of its file)."""

    @classmethod
    def from_kwargs(cls, method: str, kwargs: Mapping) -> "AccelConfig":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(
                f"accel={method!r} got unknown accel_kwargs {unknown}; it accepts {names or 'none'}."
            )
        missing = [
            f.name
            for f in fields(cls)
            if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs
        ]
        if missing:
            raise ValueError(
                f"accel={method!r} needs accel_kwargs {missing}: pass e.g. "
                f"generate(..., accel={method!r}, accel_kwargs={{{missing[0]!r}: ...}})."
            )
        cfg = cls(**dict(kwargs))
        cfg.validate(method)
        return cfg

    def validate(self, method: str) -> None:
        return None

    def to_dict(self) -> dict:
        """The options as accel_kwargs (values as given: a model or a trained part is passed on, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve(model, accel, accel_kwargs, generation_config):
    """The methods of this call as a list of ``(method, kwargs)``, or None for vanilla generate.

    One method: ``accel="aded"`` (+ ``accel_kwargs``), ``{"method": "aded", **kwargs}`` or a method config.
    A composition (one KV method + one speculative method, checked by the hook): ``accel=["duo_attention", "aded"]``
    with ``accel_kwargs={"duo_attention": {...}, "aded": {...}}``, or the entry
    ``{"method": ["duo_attention", "aded"], "duo_attention": {...}, "aded": {...}}``.
    """
    configs = [c for c in (generation_config, getattr(model, "generation_config", None)) if c is not None]
    if any(getattr(c, "is_assistant", False) for c in configs[:1]):
        return None  # an assistant model's generate (HF deep-copies the main config into it)
    if accel is None:
        for c in configs:
            spec = getattr(c, KEY, None)
            if spec is not None:
                accel = spec
                break
    if accel is None:
        if accel_kwargs:
            raise ValueError("accel_kwargs= was given without accel=: name the method, e.g. accel='aded'.")
        return None
    if accel is False or (isinstance(accel, str) and accel.lower() in VANILLA):
        return None
    if accel_kwargs is not None and not isinstance(accel_kwargs, Mapping):
        raise ValueError(f"accel_kwargs= must be a dict, got {type(accel_kwargs).__name__}.")
    if isinstance(accel, (list, tuple)):
        return _composition(list(accel), {}, accel_kwargs)
    if isinstance(accel, str):
        method, kw = accel, {}
    elif isinstance(accel, Mapping):
        kw = dict(accel)
        method = kw.pop("method", None)
        if isinstance(method, (list, tuple)):
            return _composition(list(method), kw, accel_kwargs)
        if not isinstance(method, str):
            raise ValueError(
                f"the {KEY} setting {dict(accel)!r} names no method: use e.g. {{'method': 'aded', ...}}."
            )
    elif isinstance(accel, AccelConfig):
        method, kw = method_of(accel), accel.to_dict()
    else:
        raise ValueError(
            "accel= takes a method name (str), a list of two names (a KV method and a speculative method), a dict "
            f"with 'method', or a method config; got {type(accel).__name__}."
        )
    if accel_kwargs is not None:
        kw.update(accel_kwargs)
    return [(method, kw)]


def _composition(names: list, entry: dict, accel_kwargs) -> list:
    """[(method, kwargs)] of a composition; kwargs come keyed by method name (from the entry, then accel_kwargs)."""
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"accel= as a list takes method names, e.g. ['duo_attention', 'aded']; got {names!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"accel={names!r} names a method twice.")
    example = "{" + ", ".join(f"{n!r}: {{...}}" for n in names) + "}"
    per = {n: {} for n in names}
    for source, what in ((entry, f"the {KEY} entry"), (accel_kwargs or {}, "accel_kwargs")):
        unknown = sorted(set(source) - set(names))
        if unknown:
            raise ValueError(
                f"{what} of the composition {names!r} has keys {unknown}; a composition takes one dict of options "
                f"per method, keyed by the method's name: {example}."
            )
        for n, value in source.items():
            if not isinstance(value, Mapping):
                raise ValueError(f"{what}[{n!r}] must be a dict of {n}'s options, got {type(value).__name__}.")
            per[n].update(value)
    return [(n, per[n]) for n in names]


def set_generation_config(target, method: str | None, **kwargs):
    """Select a method in a GenerationConfig (or a model's generation_config) so that it survives save/load.

    ``target`` is a GenerationConfig or a model. ``method`` may be a list (a composition; then pass each method's
    options as a keyword named after it: ``set_generation_config(m, ["duo_attention", "aded"],
    duo_attention={...}, aded={...})``). ``method=None`` removes the setting. The
    ``_from_model_config`` flag is cleared: transformers drops unknown keys from configs that carry it
    when the model is reloaded.
    """
    gc = getattr(target, "generation_config", target)
    if method is None:
        if hasattr(gc, KEY):
            delattr(gc, KEY)
        return gc
    value = {"method": list(method) if isinstance(method, (list, tuple)) else method, **copy.deepcopy(kwargs)}
    import json

    try:
        json.dumps(value)
    except TypeError as e:
        raise ValueError(
            f"{KEY} settings must be JSON-serialisable to be saved with the GenerationConfig ({e}); pass paths, "
            "not objects, or pass objects per call with accel_kwargs=."
        ) from None
    setattr(gc, KEY, value)
    if getattr(gc, "_from_model_config", False):
        gc._from_model_config = False
    return gc
