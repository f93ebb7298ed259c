"""Layer-level control of a model's forward, for methods that skip, replace or read decoder layers per step
(LoRA-Drop, M2R2).

``controlled(model, control)`` routes every decoder layer (models.layers) through ``control`` for the calling
thread while the block runs. The layers are wrapped in :class:`_Controlled` modules while *any* thread has a
controlled block open on the model (installed by the first, put back by the last, under a lock; reference-counted),
and each wrapper dispatches on the calling thread's own control (a ``threading.local``): a thread with no control
open on this model runs the original layer, so two requests on one model from two threads, of the same method or of
two different layer-level methods, each see only their own control. A second ``controlled`` on the same model
in the same thread is a real nesting and an error. The wrapper hands each call to ``control.layer(i, call)``; ``call``
(a :class:`LayerCall`) can run the original layer (``call.run()``, optionally over a subset of the cached slots) or
return a replacement hidden state without running it (``call.skip(h)``: the layer then writes no KV). The original
layer module itself is never modified, so hooks on it (accelerate's offload / device_map hooks included) keep
working.

Per-layer KV lengths. A layer that was skipped on some steps holds fewer KV slots than the engine has recorded
(the engine keeps one slot per committed token, engine/cache.py). :class:`HeldSlots` keeps, per layer, which
engine slots the layer holds; ``call.run(cols=...)`` narrows the forward's 4D mask to those columns plus the new
tokens', so a layer sees exactly its own cached tokens at their own logical positions (positions come from the
engine's ``position_ids``, never from a layer's cache length — the mistake LoRA-Drop's reference code makes by
building every layer's mask from layer 0's length). Layer 0 is never skipped, so transformers' own bookkeeping
(which reads layer 0's length) stays right.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from functools import lru_cache

import torch
from torch import nn

from .. import models


_MASK_INDEX: dict = {}  # layer class -> _mask_index (a plain dict: dynamo traces it, where it warns on lru_cache)


def _mask_index(cls) -> int | None:
    """Position of ``attention_mask`` among a layer class's positional parameters (GPT-2 passes it positionally)."""
    if cls in _MASK_INDEX:
        return _MASK_INDEX[cls]
    params = [p for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    found = next((i for i, p in enumerate(params) if p.name == "attention_mask"), None)
    _MASK_INDEX[cls] = found
    return found


class LayerCall:
    """One call of decoder layer ``index`` inside a controlled forward."""

    __slots__ = ("index", "layer", "args", "kwargs", "control")

    def __init__(self, index, layer, args, kwargs, control):
        self.index, self.layer, self.args, self.kwargs, self.control = index, layer, args, kwargs, control

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @property
    def mask(self):
        i = _mask_index(type(self.layer))
        if "attention_mask" in self.kwargs:
            return self.kwargs["attention_mask"]
        if i is not None and i < len(self.args):
            return self.args[i]
        return None

    def _with_mask(self, mask):
        i = _mask_index(type(self.layer))
        args, kwargs = self.args, dict(self.kwargs)
        if "attention_mask" in kwargs or i is None or i >= len(args):
            kwargs["attention_mask"] = mask
        else:
            args = args[:i] + (mask,) + args[i + 1 :]
        return args, kwargs

    def run(self, cols: torch.Tensor | None = None, hide: torch.Tensor | None = None):
        """Run the original layer. ``cols``: the cached slots this layer holds (LongTensor of engine slot
        indices); the 4D mask is narrowed to them plus the new tokens. ``hide``: (B, K) bool over the mask's key
        columns, True = not visible (used by training to simulate skipped KV)."""
        if cols is None and hide is None:
            return self.layer(*self.args, **self.kwargs)
        mask = self.mask
        if not torch.is_tensor(mask) or mask.dim() != 4 or mask.dtype == torch.bool:
            raise RuntimeError(
                "layer-level methods need the engine's additive 4D attention masks; this forward got "
                f"{type(mask).__name__ if not torch.is_tensor(mask) else tuple(mask.shape)}"
            )
        if hide is not None:
            mask = mask.masked_fill(hide[:, None, None, :], torch.finfo(mask.dtype).min)
        if cols is not None:
            n = self.hidden.shape[1]
            s = mask.shape[-1] - n
            keep = torch.cat([cols.to(mask.device), torch.arange(s, s + n, device=mask.device)])
            mask = mask.index_select(-1, keep)
        args, kwargs = self._with_mask(mask)
        return self.layer(*args, **kwargs)

    def skip(self, hidden: torch.Tensor):
        """The layer's output, replaced by ``hidden``, without running it (no KV written)."""
        return self.control.format_output(hidden)


class LayerControl:
    """What a method does with each decoder layer in one forward (subclass and override :meth:`layer`)."""

    _template = None  # layer 0's output of the current forward: skipped layers return the same structure

    def layer(self, index: int, call: LayerCall):
        return call.run()

    def format_output(self, hidden):
        t = self._template
        if isinstance(t, tuple):
            return (hidden,) + (None,) * (len(t) - 1)
        return hidden

    def _call(self, index, layer, args, kwargs):
        out = self.layer(index, LayerCall(index, layer, args, kwargs, self))
        if index == 0:
            self._template = out
        return out


class _Controlled(nn.Module):
    def __init__(self, index: int, inner: nn.Module, key: int):
        super().__init__()
        self.inner = inner
        self.__dict__["_index"], self.__dict__["_key"] = index, key

    def __getattr__(self, name):  # attention_type, layer_idx, ... read by the decoder's loop
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        control = getattr(_THREAD, "controls", {}).get(self._key)
        if control is None:  # no controlled block of this thread on this model: the original layer
            return self.inner(*args, **kwargs)
        return control._call(self._index, self.inner, args, kwargs)


_THREAD = threading.local()  # .controls: {id(layer list): control} of this thread's open controlled blocks
_LOCK = threading.Lock()
_INSTALLED: dict = {}  # id(layer list) -> [open blocks over all threads, original layers]


def _install(layers) -> int:
    key = id(layers)
    with _LOCK:
        entry = _INSTALLED.get(key)
        if entry is None:
            originals = list(layers)
            if any(isinstance(m, _Controlled) for m in originals):
                raise RuntimeError("hf_accel: this model's layers are wrapped by another copy of hf_accel's layer "
                                   "control; leave it before starting a layer-level method")
            for i, layer in enumerate(originals):
                _mask_index(type(layer))  # known before a compiled step traces a layer call (no signature inspection there)
                layers[i] = _Controlled(i, layer, key)
            _INSTALLED[key] = [1, originals]
        else:
            entry[0] += 1
    return key


def _uninstall(layers, key: int) -> None:
    with _LOCK:
        entry = _INSTALLED[key]
        entry[0] -= 1
        if entry[0] == 0:
            for i, layer in enumerate(entry[1]):
                layers[i] = layer
            del _INSTALLED[key]


@contextlib.contextmanager
def controlled(model, control: LayerControl):
    """Route every decoder layer of ``model`` through ``control`` while the block runs, for the calling thread
    only (see the module docstring); other threads' forwards on the model are not touched."""
    layers = models.layers(model)
    controls = getattr(_THREAD, "controls", None)
    if controls is None:
        controls = _THREAD.controls = {}
    if id(layers) in controls:
        raise RuntimeError("hf_accel: this model's layers are already under a layer-level method in this thread "
                           "(nested call); run the inner generate on a copy of the model")
    key = _install(layers)
    controls[key] = control
    try:
        yield control
    finally:
        del controls[key]
        _uninstall(layers, key)


class HeldSlots:
    """Which engine cache slots each decoder layer holds, for layers that skip some steps (see module docstring).

    ``cols(i)`` is None while layer i holds every slot (then the engine's mask applies as is)."""

    def __init__(self, n_layers: int, device):
        self.device = device
        self._held: list = [None] * n_layers  # None: all slots; else a list of slot indices
        self._parts: list = [None] * n_layers

    def cols(self, i: int):
        if self._held[i] is None:
            return None
        if self._parts[i] is None:
            self._parts[i] = torch.tensor(self._held[i], dtype=torch.long, device=self.device)
        return self._parts[i]

    def ran(self, i: int, start: int, n: int) -> None:
        """Layer i ran over the n new slots ``[start, start + n)`` (and so stored their KV)."""
        if self._held[i] is not None:
            self._held[i].extend(range(start, start + n))
            self._parts[i] = None

    def skipped(self, i: int, start: int) -> None:
        """Layer i skipped the forward whose new slots start at ``start`` (it stores nothing for them)."""
        if self._held[i] is None:
            self._held[i] = list(range(start))
            self._parts[i] = None


__all__ = ["LayerCall", "LayerControl", "HeldSlots", "controlled"]
