"""The generate() hook: ``model.generate(..., accel="aded", accel_kwargs={...})`` for every HF causal LM.

``install()`` wraps ``GenerationMixin.generate`` once. Without a method selected (no ``accel=``, no
``hf_accel`` entry in the generation config), the wrapper calls the original generate with exactly the
arguments it got. With one, it validates the request (one ValueError naming the problem and the fix,
before anything is built), builds the method's adapter for this request, and calls the original generate
with ``custom_generate=`` the shared engine, so HF still prepares inputs, processors and criteria.
Nothing is patched on the model, so an error leaves it exactly as it was.
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref

from transformers import GenerationMixin, StaticCache
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from . import config as accel_config
from . import models, registry
from .engine import loop

_ORIGINAL = None
_STATIC = {"static", "offloaded_static", "hybrid", "hybrid_chunked", "sliding_window", "paged"}
# results of finished runs (not decoding state): output tensor -> stats, model -> stats of its last run
_STATS_BY_OUTPUT: dict = {}  # id(tensor) -> (weakref to tensor, stats); tensors can't be weak dict keys
_STATS_BY_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def installed() -> bool:
    return _ORIGINAL is not None


def install() -> None:
    """Add accel= to GenerationMixin.generate (idempotent). Done by ``import hf_accel``."""
    global _ORIGINAL
    if _ORIGINAL is not None:
        return
    original = GenerationMixin.generate

    @functools.wraps(original)
    def generate(self, *args, accel=None, accel_kwargs=None, **kwargs):
        return _generate(self, original, args, kwargs, accel, accel_kwargs)

    generate.__hf_accel_wrapper__ = True
    _ORIGINAL = original
    GenerationMixin.generate = generate


def uninstall() -> None:
    """Restore the original GenerationMixin.generate."""
    global _ORIGINAL
    if _ORIGINAL is None:
        return
    GenerationMixin.generate = _ORIGINAL
    _ORIGINAL = None


def _generate(model, original, args, kwargs, accel, accel_kwargs):
    bound = inspect.signature(original).bind(model, *args, **kwargs)
    call = dict(bound.arguments)
    extra = call.pop("kwargs", {})
    spec = accel_config.resolve(model, accel, accel_kwargs, call.get("generation_config"))
    if spec is None:
        return original(model, *args, **kwargs)
    method, method_kwargs = spec
    cls = registry.get(method)
    models.check_causal_lm(model)
    gen_config = _effective_config(model, call.get("generation_config"), extra)
    _validate(model, method, cls, call, extra, gen_config, method_kwargs)
    cfg = cls.Config.from_kwargs(method, method_kwargs)
    adapter = cls(model, cfg)

    streamer = call.get("streamer")
    stop_strings = gen_config.stop_strings
    tokenizer = extra.pop("tokenizer", None)
    if stop_strings:
        if tokenizer is None:
            raise ValueError(
                "stop_strings needs the model's tokenizer: pass generate(..., tokenizer=tokenizer) "
                "(as vanilla generate requires)."
            )
        criteria = StoppingCriteriaList(list(call.get("stopping_criteria") or []))
        criteria.append(StopStringCriteria(stop_strings=stop_strings, tokenizer=tokenizer))
        call["stopping_criteria"] = criteria
        extra.pop("stop_strings", None)
        passed = call.get("generation_config")
        call["generation_config"] = copy.deepcopy(passed if passed is not None else model.generation_config)
        call["generation_config"].stop_strings = None

    def sink(sequences, stats):
        key = id(sequences)
        _STATS_BY_OUTPUT[key] = (weakref.ref(sequences), stats)
        weakref.finalize(sequences, _STATS_BY_OUTPUT.pop, key, None)
        _STATS_BY_MODEL[model] = stats

    call["custom_generate"] = functools.partial(
        loop.run, accel_adapter=adapter, accel_streamer=streamer, accel_stats_sink=sink
    )
    self_ = call.pop("self", model)
    return original(self_, **call, **extra)


def _effective_config(model, passed, extra):
    gc = copy.deepcopy(passed if passed is not None else model.generation_config)
    for key, value in extra.items():
        if hasattr(gc, key) and not key.startswith("_"):
            setattr(gc, key, value)
    return gc


def _validate(model, method, cls, call, extra, gc, method_kwargs=None) -> None:
    if call.get("custom_generate") is not None:
        raise ValueError(f"accel={method!r} can't be combined with custom_generate=: pass one of them.")
    if (gc.num_beams or 1) > 1:
        raise ValueError(
            f"accel={method!r} does not do beam search (num_beams={gc.num_beams}): use num_beams=1, or drop accel=."
        )
    if call.get("assistant_model") is not None or extra.get("assistant_model") is not None:
        raise ValueError(
            f"accel={method!r} can't be combined with assistant_model=: HF assisted decoding is its own accelerator. "
            "Drop one of them."
        )
    if getattr(gc, "prompt_lookup_num_tokens", None) or getattr(gc, "assistant_early_exit", None):
        raise ValueError(
            f"accel={method!r} can't be combined with HF's own speculative options "
            "(prompt_lookup_num_tokens / assistant_early_exit): drop one of them."
        )
    cache = extra.get("past_key_values")
    if gc.cache_implementation in _STATIC and gc.cache_implementation != "static":
        raise ValueError(
            f"accel={method!r} runs on a dynamic cache or on its own static cache "
            f"(cache_implementation='static'); cache_implementation={gc.cache_implementation!r} is not supported. "
            "Use cache_implementation='static' or leave it unset."
        )
    no_static = cls.static_refusal(method_kwargs or {})
    if gc.cache_implementation == "static" and no_static:
        raise ValueError(
            f"accel={method!r} does not run on the static engine (cache_implementation='static'): "
            f"{no_static} Leave cache_implementation unset for it."
        )
    if isinstance(cache, StaticCache):
        raise ValueError(
            f"accel={method!r} builds its own static cache: pass cache_implementation='static' instead of a "
            "StaticCache in past_key_values=."
        )
    if cache is not None:
        raise ValueError(
            f"accel={method!r} builds its own cache from the prompt: don't pass past_key_values=; pass the whole "
            "conversation as input_ids instead."
        )
    if extra.get("inputs_embeds") is not None:
        raise ValueError(f"accel={method!r} needs input_ids; inputs_embeds= is not supported.")
    if call.get("prefix_allowed_tokens_fn") is not None:
        raise ValueError(f"accel={method!r} does not support prefix_allowed_tokens_fn=; drop one of them.")
    if (getattr(gc, "guidance_scale", None) or 1) != 1 or call.get("negative_prompt_ids") is not None:
        raise ValueError(f"accel={method!r} does not support classifier-free guidance (guidance_scale); drop one.")
    if gc.return_dict_in_generate and (gc.output_attentions or gc.output_hidden_states):
        raise ValueError(
            f"accel={method!r} can't return attentions or hidden states (they'd cover draft tokens too): "
            "drop output_attentions / output_hidden_states."
        )
    if call.get("synced_gpus"):
        raise ValueError(f"accel={method!r} does not support synced_gpus=True.")


def stats(obj):
    """Statistics of an accel run: pass its output (tensor or GenerateDecoderOnlyOutput) or the model."""
    found = getattr(obj, "accel_stats", None)
    if found is not None:
        return found
    seqs = getattr(obj, "sequences", obj)
    entry = _STATS_BY_OUTPUT.get(id(seqs))
    if entry is not None and entry[0]() is seqs:
        return entry[1]
    try:
        found = _STATS_BY_MODEL.get(obj)
    except TypeError:
        found = None
    if found is None:
        raise ValueError(
            "no hf_accel statistics for this object: pass the output of generate(..., accel=...) or the model "
            "it ran on."
        )
    return found
