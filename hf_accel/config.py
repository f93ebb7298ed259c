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
import numbers
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields

from . import registry
from .registry import method_of

KEY = "hf_accel"
VANILLA = {"none", "vanilla", "off"}


def option(default=MISSING, *, min=None, max=None, gt=None, choices=None, default_factory=MISSING):
    """A config field with its limits, checked by ``AccelConfig.from_kwargs`` together with the field's type:
    ``min``/``max`` (inclusive) and ``gt`` (exclusive lower bound) for numbers; ``choices``: the strings allowed
    where the type admits ``str`` (e.g. ``max_nodes: int | str = option(64, min=1, choices=("auto",))``)."""
    meta = {k: v for k, v in dict(min=min, max=max, gt=gt, choices=choices).items() if v is not None}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _matches(value, tp, choices) -> bool:
    """Whether ``value`` is of the (resolved) annotation ``tp``: int rejects bool and str, float takes ints,
    Literal compares value and type, unions take any member, str is limited to ``choices`` when given."""
    if tp is typing.Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a, choices) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(tp))
    if origin is not None:  # list[int], dict[str, Any], ...: the container type only
        tp = origin
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str) and (not choices or value in choices)
    if tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not understand: the method's validate() decides


def _describe(tp, meta) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'a number in [0, 1]', "one of 'a', 'b'", ..."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        parts = [_describe(a, meta) for a in typing.get_args(tp)]
        parts = [p for p in parts if p] or ["any value"]
        return " or ".join(dict.fromkeys(parts))
    if tp is None or tp is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        tp = origin
    if tp in (int, float):
        word = "an integer" if tp is int else "a number"
        lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
        if lo is not None and hi is not None:
            return f"{word} in [{lo}, {hi}]"
        if gt is not None:
            return f"{word} > {gt}"
        if lo is not None:
            return f"{word} >= {lo}"
        if hi is not None:
            return f"{word} <= {hi}"
        return word
    if tp is bool:
        return "True or False"
    if tp is str:
        return ("one of " + ", ".join(repr(c) for c in meta["choices"])) if meta.get("choices") else "a string"
    if tp is dict:
        return "a dict"
    if tp is typing.Any:
        return "any value"
    return f"a {getattr(tp, '__name__', tp)}"


def _in_range(value, meta) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return True
    lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
    return not ((lo is not None and value < lo) or (hi is not None and value > hi) or (gt is not None and value <= gt))


PART = "part"  # the common accel_kwargs key of every trained method's trained part (AccelConfig.part_option)


def _same(a, b) -> bool:
    """Whether two values given for one option are the same (paths compared as strings; tensors, modules and
    other objects by identity)."""
    if a is b:
        return True
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        return os.fspath(a) == os.fspath(b)
    return False


def _short(value) -> str:
    """An option's value in an error message: a path as written, anything else by its type."""
    if isinstance(value, (str, os.PathLike)) or value is None:
        return repr(os.fspath(value) if value is not None else value)
    return f"<{type(value).__name__}>"


_HINTS: dict = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception:  # an annotation that can't be resolved at run time: check the fields that can be
            _HINTS[cls] = {}
            for klass in reversed(cls.__mro__):
                glb = vars(__import__(klass.__module__, fromlist=["_"]))
                for name, ann in getattr(klass, "__annotations__", {}).items():
                    try:
                        _HINTS[cls][name] = eval(ann, glb) if isinstance(ann, str) else ann  # noqa: S307
                    except Exception:
                        _HINTS[cls][name] = typing.Any
    return _HINTS[cls]


@dataclass
class AccelConfig:
    """Base of every method's config dataclass (one per adapter, at the top of its file).

    Every option is checked against its field's annotation and its ``option(...)`` limits before the
    dataclass is built (``check_options``); ``validate()`` holds only what involves several options or
    more than a type (a missing trained part, a combination that can't work).

    A trained method names the option that takes its trained part (the folder ``hf-accel train <method>`` writes,
    or the loaded part) in ``part_option``: ``heads`` (Clover, Hidden Transfer), ``adapter`` (LUD, LoRA-Drop,
    M2R2), ``pattern`` (DuoAttention). Every such method also takes it as ``part=`` (:data:`PART`), one name for
    the concept across methods: ``accel_kwargs={"part": folder}`` is ``{"heads": folder}`` for Clover. The method's
    own name stays an alias; both with different values is a ValueError (:meth:`canonical`)."""

    #: the option holding this method's trained part, also accepted as ``part=``; None: no trained part
    part_option: typing.ClassVar[str | None] = None

    @classmethod
    def canonical(cls, method: str, kwargs: Mapping) -> Mapping:
        """``kwargs`` with ``part=`` given under the method's own name (``part_option``); ``kwargs`` itself when it
        has no ``part``. A ValueError when the method has no trained part, or gets both names with different
        values."""
        if PART not in kwargs:
            return kwargs
        own = cls.part_option
        if own is None:
            trained = sorted(n for n in registry.available() if getattr(registry.get(n).Config, "part_option", None))
            raise ValueError(
                f"accel={method!r} has no trained part, so it takes no {PART}= option ({PART}= is the trained-part "
                f"folder of {', '.join(trained)}): leave it out."
            )
        kw = dict(kwargs)
        value = kw.pop(PART)
        if own in kw and not _same(kw[own], value):
            raise ValueError(
                f"accel={method!r} got {PART}={_short(value)} and {own}={_short(kw[own])}: both name its trained part "
                f"({own}= is the method's own name for {PART}=); pass one of them."
            )
        kw[own] = value
        return kw

    @classmethod
    def check_options(cls, method: str, kwargs: Mapping) -> None:
        """One ValueError naming the option, what it takes and what it got, for the first option that has the
        wrong type or is out of range; also for unknown and missing options."""
        kwargs = cls.canonical(method, kwargs)
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
        hints = _hints(cls)
        for f in fields(cls):
            if f.name not in kwargs:
                continue
            value, tp, meta = kwargs[f.name], hints.get(f.name, typing.Any), f.metadata
            if not (_matches(value, tp, meta.get("choices")) and _in_range(value, meta)):
                example = f.default if f.default is not MISSING and f.default is not None else None
                fix = (f"pass e.g. accel_kwargs={{{f.name!r}: {example!r}}}" if example is not None
                       else "pass such a value or leave it out for the default")
                raise ValueError(
                    f"accel={method!r}: {f.name} must be {_describe(tp, meta)}, got {value!r} "
                    f"({type(value).__name__}); {fix}."
                )

    @classmethod
    def from_kwargs(cls, method: str, kwargs: Mapping) -> "AccelConfig":
        kwargs = cls.canonical(method, kwargs)
        cls.check_options(method, kwargs)
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
    from_config = False
    if accel is None:
        for c in configs:
            spec = getattr(c, KEY, None)
            if spec is not None:
                accel, from_config = spec, True
                break
    if from_config and not (spec is False or isinstance(spec, (str, Mapping, list, tuple, AccelConfig))):
        raise ValueError(
            f"the generation_config's {KEY} setting is {spec!r} ({type(spec).__name__}); it must be a method name or "
            f"a dict like {{'method': 'aded', ...}}: fix it with hf_accel.set_generation_config(model, 'aded', ...) "
            f"(or set_generation_config(model, None) to remove it)."
        )
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


def split_methods(specs: list):
    """(kv, speculative): each (name, class, kwargs) or None, from the resolved [(name, kwargs)]."""
    resolved = [(name, registry.get(name), kw) for name, kw in specs]
    resolved = [(name, cls, cls.Config.canonical(name, kw)) for name, cls, kw in resolved]  # part= -> own name
    kv = [r for r in resolved if getattr(r[1], "kv_method", False)]
    spec = [r for r in resolved if not getattr(r[1], "kv_method", False)]
    if len(resolved) > 2 or len(kv) > 1 or len(spec) > 1:
        names = [r[0] for r in resolved]
        kv_names = [n for n in registry.available() if getattr(registry.get(n), "kv_method", False)]
        raise ValueError(
            f"accel={names!r}: a composition is one KV method ({', '.join(kv_names)}) plus at most one speculative "
            "method, e.g. accel=['duo_attention', 'aded']."
        )
    return (kv[0] if kv else None), (spec[0] if spec else None)


def check(accel, accel_kwargs=None) -> None:
    """Check a method selection (an ``hf_accel`` entry, or ``accel=`` + ``accel_kwargs=``) without a model: the
    method names, the composition and every option's type and range (AccelConfig.from_kwargs). One ValueError."""

    specs = resolve(None, accel, accel_kwargs, None)
    if specs is None:
        return
    split_methods(specs)  # unknown method names, compositions that are not one KV + one speculative method
    for name, kw in specs:
        registry.get(name).Config.from_kwargs(name, kw)


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
    if not (isinstance(method, str) or (isinstance(method, (list, tuple)) and all(isinstance(m, str) for m in method))):
        raise ValueError(
            f"set_generation_config takes a method name (or a list of two: a KV method and a speculative method), "
            f"got {method!r}; e.g. set_generation_config(model, 'aded', max_nodes=64)."
        )
    value = {"method": list(method) if isinstance(method, (list, tuple)) else method, **copy.deepcopy(kwargs)}
    check(value)
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
