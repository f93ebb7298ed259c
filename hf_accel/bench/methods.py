"""What ``hf-accel bench --methods`` accepts, and how each entry calls ``generate``.

A method entry is ``name`` or ``name(key=value, ...)``; values are read as JSON where they parse, else as
strings (``aded(max_nodes=32,search=mcts)``). Names:

* ``vanilla``: HF generate with the default dynamic cache, eager (the token-match reference).
* ``vanilla-static``: HF generate with ``cache_implementation="static"``, which transformers compiles on
  its own on a GPU (the fast baseline a user already has), run fairly: one ``max_cache_len`` for the whole run
  (the longest row + ``max_new_tokens``) so the cache never changes shape, and warmed up (untimed) on every
  distinct row shape of the run. The headline ratios are taken against it when it is in the run. On CPU it runs
  uncompiled.
* ``vanilla-static-naive``: the same as a user would first call it: ``cache_implementation="static"`` alone
  (transformers sizes the cache per call, growing it when a longer call comes), one short warm-up call; any
  recompilation inside the timed calls is counted.
* ``hf-pld``: HF prompt lookup decoding (``prompt_lookup_num_tokens``, default 10). Batch 1 only (transformers).
* ``hf-assisted``: HF assisted generation with ``--draft-model``. Batch 1 only (transformers).
* ``hf-pld+static`` / ``hf-assisted+static``: the same on a static cache with the fixed ``max_cache_len``, where
  the installed transformers allows it (5.24+); skipped with the reason otherwise.
* any registered hf_accel method (``hf_accel.available()``), called with ``accel=name, accel_kwargs=...``;
  ``name+static`` (``aded(max_nodes=32)+static``) runs it on the static-cache engine, CUDA graphs on a GPU.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

from .. import registry

BASELINES = ("vanilla", "vanilla-static", "vanilla-static-naive", "hf-pld", "hf-assisted")
HF_COMPILED = ("vanilla-static", "vanilla-static-naive")  # transformers compiles these itself (on a GPU)
HF_ASSISTED = ("hf-pld", "hf-assisted")  # transformers' assisted generation: batch 1 only
# the headline reference, strongest first: the first of these in a run is what the headline ratios are against
REFERENCES = ("vanilla-static", "vanilla")
# static-cache slots beyond the run's max_cache_len for hf-pld+static / hf-assisted+static: transformers 5.24 writes
# the last verify's draft candidates past max_length on a static cache (IndexError in the cache update without them)
ASSISTED_HEADROOM = 64


@dataclass
class Settings:
    """What every method of one bench run is called with (besides its own options): decoding (greedy or
    sampling, with the same processors and per-row seeds for every method) and the fixed static-cache size of
    the HF static baselines."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    max_cache_len: int | None = None  # HF static baselines (not vanilla-static-naive); None: transformers' own

    def sampling_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def describe(self) -> str:
        if not self.do_sample:
            return "greedy"
        return (f"sampling (temperature {self.temperature:g}, top-p {self.top_p:g}, top-k "
                f"{self.top_k if self.top_k else 'off'}, seed {self.seed} + row index)")


def headline_reference(labels) -> str:
    """The label the headline columns are relative to: ``vanilla-static`` when it ran, else ``vanilla``."""
    return next(r for r in REFERENCES + tuple(labels) if r in labels)


def hf_static_assisted_reason() -> str | None:
    """None when the installed transformers runs prompt lookup / assisted decoding on a static cache, else why
    not (older releases refuse it in ``_assisted_decoding``)."""
    import transformers
    from transformers.generation.utils import GenerationMixin

    try:
        src = inspect.getsource(GenerationMixin._assisted_decoding)
    except (OSError, TypeError, AttributeError):
        return f"can't read transformers {transformers.__version__}'s assisted decoding to check static-cache support"
    if "not supported with Static cache" in src:
        return (f"transformers {transformers.__version__} refuses prompt lookup / assisted decoding on a static cache "
                "(allowed from 5.24)")
    return None


@dataclass
class MethodSpec:
    label: str  # as written on the command line; the key in every table
    name: str
    kwargs: dict = field(default_factory=dict)
    static: bool = False  # "+static": run with cache_implementation="static" (an hf_accel method's static engine)

    @property
    def is_baseline(self) -> bool:
        return self.name in BASELINES

    @property
    def compiled(self) -> bool:
        """An HF path that transformers compiles itself (no Python forward hook can count it)."""
        return self.name in HF_COMPILED or (self.static and self.name in HF_ASSISTED)

    @property
    def fixed_static(self) -> bool:
        """An HF static-cache path run with the run's fixed ``max_cache_len`` and warmed up per row shape."""
        return self.name == "vanilla-static" or (self.static and self.name in HF_ASSISTED)


def _value(text: str):
    """An option value as written in a method spec: JSON (``16``, ``0.7``, ``true``, ``null``), Python's
    ``True`` / ``False`` / ``None``, or else the string itself (``best_first``, a path)."""
    python = {"True": True, "False": False, "None": None}
    if text in python:
        return python[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_top(text: str, sep: str = ",") -> list:
    """Split on ``sep`` outside parentheses and brackets (a list value: ``droppable=[1,2,3]``)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {ch!r} in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '(' or '[' in {text!r}")
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


class MissingPart(ValueError):
    """A method entry whose trained part (or second model) is missing: callers print a skip line."""

    def __init__(self, label: str, reason: str):
        super().__init__(f"{label}: {reason}")
        self.label, self.reason = label, reason


def parse_one(text: str, defaults: dict | None = None, model=None) -> MethodSpec:
    """One entry. ``defaults``: method -> accel_kwargs filled in where the entry doesn't set them. With ``model``,
    an hf_accel method whose trained part is missing raises :class:`MissingPart` (before option validation)."""
    text = label = text.strip()
    static = text.endswith("+static")
    if static:
        text = text[: -len("+static")]
    name, kwargs = text, {}
    if "(" in text:
        if not text.endswith(")"):
            raise ValueError(f"bad method entry {text!r}: write name, name(key=value,...) or either +static")
        name, inner = text[:-1].split("(", 1)
        for item in split_top(inner):
            key, eq, val = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"bad option {item!r} in {text!r}: write key=value")
            kwargs[key.strip()] = _value(val.strip())
    name = name.strip()
    if name not in BASELINES and name not in registry.available():
        raise ValueError(
            f"unknown bench method {name!r}. Baselines: {', '.join(BASELINES)}; hf_accel methods: "
            f"{', '.join(registry.available())}; or 'all'"
        )
    if name in registry.available():  # part= under the method's own name, so that it overrides the default part
        kwargs = registry.get(name).Config.canonical(name, kwargs)
    kwargs = {**(defaults or {}).get(name, {}), **kwargs}
    if name in registry.available():
        if model is not None:
            reason = registry.get(name).missing_artifacts(model, kwargs)
            if reason:
                raise MissingPart(label, reason)
        registry.get(name).Config.from_kwargs(name, kwargs)  # unknown options fail here, before any run
    elif static and name not in HF_ASSISTED:
        raise ValueError(f"{label!r}: +static is for hf_accel methods, hf-pld and hf-assisted (the static "
                         "baseline is vanilla-static)")
    return MethodSpec(label, name, kwargs, static)


def _skip_reason(spec: MethodSpec, batch: int) -> str | None:
    """Why ``spec`` can't run in this run (None: it can)."""
    if spec.name in HF_ASSISTED and batch > 1:
        return "transformers' prompt lookup / assisted generation runs batch 1 only"
    if spec.name in HF_ASSISTED and spec.static:
        return hf_static_assisted_reason()
    return None


def _expand_all(device: str, draft_model, model, batch: int, static: bool, defaults: dict) -> tuple:
    """(specs, skipped) of ``all`` (every baseline and hf_accel method) or ``all+static`` (every hf_accel method
    that runs on the static engine, as ``name+static``). ``defaults``: method -> accel_kwargs (committed parts)."""
    if static:
        names = [f"{n}+static" for n in registry.available()]
    else:
        names = ["vanilla", "vanilla-static", "vanilla-static-naive", "hf-pld", "hf-pld+static", "hf-assisted",
                 "hf-assisted+static", *registry.available()]
    specs, skipped = [], []
    for n in names:
        base = n[: -len("+static")] if n.endswith("+static") else n
        kw = dict(defaults.get(base, {}))
        spec = MethodSpec(n, base, kw, base != n)
        if spec.compiled and device != "cuda":
            skipped.append((n, "transformers compiles the static-cache path on a GPU only"))
        elif spec.name == "hf-assisted" and not draft_model:
            skipped.append((n, "needs --draft-model"))
        elif (reason := _skip_reason(spec, batch)) is not None:
            skipped.append((n, reason))
        else:
            reason = registry.get(base).missing_artifacts(model, kw) if base in registry.available() else None
            if reason is None and static and base in registry.available():
                reason = registry.get(base).static_refusal(kw)
            if reason:
                skipped.append((n, reason))
            else:
                specs.append(spec)
    return specs, skipped


def parse(text: str, device: str, draft_model, model=None, batch: int = 1, defaults: dict | None = None) -> tuple:
    """(specs, skipped) for a --methods value: entries, ``all`` (every baseline and method) and ``all+static``
    (every method that runs on the static engine, as ``name+static``) mixed freely. ``vanilla`` is always run first
    (the token-match reference). ``defaults``: method -> accel_kwargs filled in where an entry doesn't set them (the
    default model's committed trained parts). With ``model``, a method whose trained part is missing is skipped
    with the reason."""
    specs, skipped = [], []
    defaults = defaults or {}
    entries = split_top(text)
    for e in entries:
        if e in ("all", "all+static"):
            sp, sk = _expand_all(device, draft_model, model, batch, e == "all+static", defaults)
            specs += sp
            skipped += sk
            continue
        try:
            s = parse_one(e, defaults, model)
        except MissingPart as err:
            skipped.append((err.label, err.reason))
            continue
        if s.name == "hf-assisted" and not draft_model:
            raise ValueError("hf-assisted needs a draft model: pass --draft-model PATH")
        reason = _skip_reason(s, batch)
        if reason is None or s.name == "vanilla":
            specs.append(s)
        else:
            skipped.append((s.label, reason))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        if any(e in ("all", "all+static") for e in entries):  # an entry that 'all' also lists: keep the first
            seen = set()
            specs = [s for s in specs if not (s.label in seen or seen.add(s.label))]
            labels = [s.label for s in specs]
        else:
            raise ValueError(f"a method is listed twice in {text!r}")
    if "vanilla" not in labels:
        specs.insert(0, MethodSpec("vanilla", "vanilla"))
    else:
        specs.insert(0, specs.pop(labels.index("vanilla")))
    return specs, skipped


def generate_kwargs(spec: MethodSpec, draft, settings: Settings | None = None) -> dict:
    """Keyword arguments for ``model.generate`` beyond inputs, max_new_tokens and the decoding settings (greedy or
    sampling, see :class:`Settings`)."""
    fixed = {}
    if spec.fixed_static:
        fixed = {"cache_implementation": "static"}
        if settings is not None and settings.max_cache_len is not None:
            fixed["max_cache_len"] = settings.max_cache_len + (ASSISTED_HEADROOM if spec.name in HF_ASSISTED else 0)
    if spec.name == "vanilla":
        return {}
    if spec.name == "vanilla-static":
        return {**fixed, **spec.kwargs}
    if spec.name == "vanilla-static-naive":
        return {"cache_implementation": "static", **spec.kwargs}
    if spec.name == "hf-pld":
        return {"prompt_lookup_num_tokens": 10, **fixed, **spec.kwargs}
    if spec.name == "hf-assisted":
        return {"assistant_model": draft, **fixed, **spec.kwargs}
    kw = {"accel": spec.name, "accel_kwargs": dict(spec.kwargs)}
    if spec.static:
        kw["cache_implementation"] = "static"
    return kw
