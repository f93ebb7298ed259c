"""Attention implementations a method supplies for its own requests (DuoAttention's), switched per thread.

transformers looks a model's attention function (and mask function) up by ``config._attn_implementation`` on every
forward. A method that needs its own attention for one request can't simply set that name: another request on the
same model, in another thread, would run the method's attention too. A :class:`Switch` instead registers, once, a
*dispatcher* under its name: for a config that a request of this thread has switched (:meth:`Switch.request`), it
calls the method's functions; for any other forward it calls the model's original implementation, exactly as the
model would have (the family's eager function, or the registered sdpa / flash / ... function, and the original mask
function). The model's configs point at the dispatcher while at least one request on the model is inside a switch
(counted per model; the last one out puts the original names back), so what a forward of another thread computes
never changes.

Compiled forwards (HF's generate compiles the decode step on a compileable cache, e.g. duo_attention's static
cache): dynamo can't trace the per-thread lookup (a ContextVar), so while a model is switched, a forward traced by
torch.compile runs the switch's functions whatever its thread (duo's: ordinary attention for plain key/value tensors,
under a bool mask), and its eager forwards keep the per-thread dispatch.

Known limit: a family that branches on the implementation's *name* outside the attention interface (GPT-2's
``reorder_and_upcast_attn`` with eager attention) takes the interface path in other threads while the switch is on.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .families import eager_attention_of


def _compiling() -> bool:
    """True while torch.compile traces (HF's compiled decode step on a compileable cache)."""
    return torch.compiler.is_compiling()

# (switch name, id(config)) of the configs a request of *this* thread (context) has switched
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("hf_accel_attention_requests", default=frozenset())
# model -> [requests inside, switch name, [(config, original implementation)]]: bookkeeping of the switch
_SWITCHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ORIGINAL: dict = {}  # id(config) -> its original implementation, while the model is switched
_LOCK = threading.Lock()


def attention_configs(model) -> list:
    """Every config object of ``model`` (sub-models' and text configs included) that carries an attention
    implementation."""
    out, seen = [], set()
    for m in model.modules():
        cfg = getattr(m, "config", None) if isinstance(m, PreTrainedModel) else None
        for c in (cfg, getattr(cfg, "get_text_config", lambda: None)() if cfg is not None else None):
            if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
                seen.add(id(c))
                out.append(c)
    return out


def original_implementation(config, name: str) -> str | None:
    """The implementation ``config`` had before a switch named ``name`` (or has, once it is back)."""
    impl = _ORIGINAL.get(id(config))
    if impl is None:
        impl = getattr(config, "_attn_implementation_internal", None)
        if impl == name:  # switched, bookkeeping not visible yet: the default
            impl = "sdpa"
    return impl


def original_attention(module: nn.Module, name: str):
    """The attention function ``module`` runs without the switch (transformers' own lookup, family eager default)."""
    impl = original_implementation(getattr(module, "config", None), name)
    if impl in (None, "eager"):
        fn = eager_attention_of(module)
        if fn is not None:
            return fn
        impl = "sdpa"
    return ALL_ATTENTION_FUNCTIONS[impl]


@contextlib.contextmanager
def implementation(model, name: str):
    """Every attention config of ``model`` names ``name`` inside the block (for every thread: training code that owns
    the model, e.g. duo's gate training); the previous names come back on exit, error or not."""
    saved = [(c, c._attn_implementation_internal) for c in attention_configs(model)]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = name
        yield
    finally:
        for c, impl in reversed(saved):
            c._attn_implementation_internal = impl


class Switch:
    """An attention implementation (``attention``: transformers' AttentionInterface signature; ``mask``: the
    AttentionMaskInterface signature) used only by the requests that enter :meth:`request`."""

    def __init__(self, name: str, attention, mask):
        self.name, self.attention, self.mask = name, attention, mask
        self._registered = False

    def _register(self) -> None:
        if self._registered:
            return
        with _LOCK:
            AttentionInterface.register(self.name, self._dispatch_attention)
            AttentionMaskInterface.register(self.name, self._dispatch_mask)
            self._registered = True

    def _mine(self, config) -> bool:
        if _compiling():  # dynamo can't trace ContextVar.get: a compiled forward on a switched model is the switch's
            return True
        return (self.name, id(config)) in _ACTIVE.get()

    def _dispatch_attention(self, module, query, key, value, attention_mask, *args, **kwargs):
        if self._mine(getattr(module, "config", None)):
            return self.attention(module, query, key, value, attention_mask, *args, **kwargs)
        return original_attention(module, self.name)(module, query, key, value, attention_mask, *args, **kwargs)

    def _dispatch_mask(self, *args, **kwargs):
        config = kwargs.get("config")
        if _compiling():
            return self.mask(*args, **kwargs)
        if config is None:  # transformers versions that don't pass it: this thread's requests decide
            mine = any(n == self.name for n, _ in _ACTIVE.get())
            originals = set(_ORIGINAL.values())
            impl = originals.pop() if len(originals) == 1 else "sdpa"
        else:
            mine = self._mine(config)
            impl = original_implementation(config, self.name)
        if mine:
            return self.mask(*args, **kwargs)
        fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl or "eager")
        return fn(*args, **kwargs) if fn is not None else None

    @contextlib.contextmanager
    def switched(self, model):
        """``model``'s configs name this switch inside the block (forwards not in a :meth:`request` of their own
        thread still get the original implementation); the original names come back when the last request on the
        model leaves, error or not."""
        self._register()
        with _LOCK:
            entry = _SWITCHED.get(model)
            if entry is not None and entry[1] != self.name:
                raise RuntimeError(
                    f"{type(model).__name__}'s attention is switched to {entry[1]!r} by another request; "
                    f"{self.name!r} can't run on it at the same time."
                )
            if entry is None:
                saved = [(c, c._attn_implementation_internal) for c in attention_configs(model)]
                for c, impl in saved:
                    _ORIGINAL[id(c)] = impl
                for c, _ in saved:
                    c._attn_implementation_internal = self.name
                entry = _SWITCHED[model] = [0, self.name, saved]
            entry[0] += 1
        try:
            yield entry[2]
        finally:
            with _LOCK:
                entry[0] -= 1
                if entry[0] == 0:
                    for c, impl in entry[2]:
                        c._attn_implementation_internal = impl
                    for c, _ in entry[2]:
                        _ORIGINAL.pop(id(c), None)
                    _SWITCHED.pop(model, None)

    @contextlib.contextmanager
    def request(self, model):
        """One request of this thread runs ``model`` with this switch's functions inside the block."""
        with self.switched(model) as saved:
            token = _ACTIVE.set(_ACTIVE.get() | {(self.name, id(c)) for c, _ in saved})
            try:
                yield
            finally:
                _ACTIVE.reset(token)


__all__ = ["Switch", "attention_configs", "implementation", "original_attention", "original_implementation"]
