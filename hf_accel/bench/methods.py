"""What ``hf-accel bench --methods`` accepts, and how each entry calls ``generate``.

A method entry is ``name`` or ``name(key=value, ...)``; values are read as JSON where they parse, else as
strings (``aded(max_nodes=32,search=mcts)``). Names:

* ``vanilla``: HF greedy generate with the default dynamic cache (the reference every ratio is taken against).
* ``vanilla-static``: HF generate with ``cache_implementation="static"``, which transformers compiles on
  its own on a GPU (the fast baseline a user already has). On CPU it runs uncompiled.
* ``hf-pld``: HF prompt lookup decoding (``prompt_lookup_num_tokens``, default 10).
* ``hf-assisted``: HF assisted generation with ``--draft-model``.
* any registered hf_accel method (``hf_accel.available()``), called with ``accel=name, accel_kwargs=...``;
  ``name+static`` (``aded(max_nodes=32)+static``) runs it on the static-cache engine, CUDA graphs on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import registry

BASELINES = ("vanilla", "vanilla-static", "hf-pld", "hf-assisted")


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
        return self.name == "vanilla-static"


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_top(text: str, sep: str = ",") -> list:
    """Split on ``sep`` outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
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
    kwargs = {**(defaults or {}).get(name, {}), **kwargs}
    if name in registry.available():
        if model is not None:
            reason = registry.get(name).missing_artifacts(model, kwargs)
            if reason:
                raise MissingPart(label, reason)
        registry.get(name).Config.from_kwargs(name, kwargs)  # unknown options fail here, before any run
    elif static:
        raise ValueError(f"{label!r}: +static is for hf_accel methods (the static baseline is vanilla-static)")
    return MethodSpec(label, name, kwargs, static)


def parse(text: str, device: str, draft_model, model=None, defaults: dict | None = None) -> tuple:
    """(specs, skipped) for a --methods value. ``vanilla`` is always run first (the reference). ``defaults``:
    method -> accel_kwargs filled in where an entry doesn't set them (the default model's committed trained parts).
    With ``model``, a method whose trained part is missing is skipped with the reason, listed or from 'all'."""
    skipped = []
    defaults = defaults or {}
    if text.strip() == "all":
        names = ["vanilla", "vanilla-static", "hf-pld", "hf-assisted", *registry.available()]
        specs = []
        for n in names:
            if n == "vanilla-static" and device != "cuda":
                skipped.append((n, "transformers compiles the static-cache path on a GPU only"))
            elif n == "hf-assisted" and not draft_model:
                skipped.append((n, "needs --draft-model"))
            else:
                kw = dict(defaults.get(n, {}))
                reason = registry.get(n).missing_artifacts(model, kw) if n in registry.available() else None
                if reason:
                    skipped.append((n, reason))
                else:
                    specs.append(MethodSpec(n, n, kw))
    else:
        specs = []
        for t in split_top(text):
            try:
                s = parse_one(t, defaults, model)
            except MissingPart as e:
                skipped.append((e.label, e.reason))
                continue
            if s.name == "hf-assisted" and not draft_model:
                raise ValueError("hf-assisted needs a draft model: pass --draft-model PATH")
            specs.append(s)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method is listed twice in {text!r}")
    if "vanilla" not in labels:
        specs.insert(0, MethodSpec("vanilla", "vanilla"))
    else:
        specs.insert(0, specs.pop(labels.index("vanilla")))
    return specs, skipped


def generate_kwargs(spec: MethodSpec, draft) -> dict:
    """Keyword arguments for ``model.generate`` (beyond inputs, max_new_tokens and greedy)."""
    if spec.name == "vanilla":
        return {}
    if spec.name == "vanilla-static":
        return {"cache_implementation": "static", **spec.kwargs}
    if spec.name == "hf-pld":
        return {"prompt_lookup_num_tokens": 10, **spec.kwargs}
    if spec.name == "hf-assisted":
        return {"assistant_model": draft, **spec.kwargs}
    kw = {"accel": spec.name, "accel_kwargs": dict(spec.kwargs)}
    if spec.static:
        kw["cache_implementation"] = "static"
    return kw
